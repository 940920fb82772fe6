//! The restore, fenced: CRIU leaves every task stopped, Ready goes to the
//! sender, and only a journalled Commit lets the copy run. Before the
//! Commit a failure removes the copy (presumed abort); after it the copy
//! is the container and is never removed by this receiver.

use super::*;

impl<'a> Session<'a> {
    /// The restore, fenced: every task left stopped, checked, and Ready
    /// sent.
    pub(super) fn restore(&mut self, manifest: &Manifest) -> Result<(), (MigrationError, Outcome)> {
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        self.step(DestinationEvent::StateVerified).map_err(resumed)?;
        self.rep.phase(Phase::Restore);
        let restore_started = Instant::now();
        let st = self.staging.as_mut().expect("staging exists");
        st.restore_attempted = true;
        // What the images did not use goes back before the restore needs it.
        st.reserve = None;
        // The restore's first read block is handed over as CRIU takes it,
        // on the CPU CRIU's restorer runs on.
        let block = st.restore_block.take();
        let images = st.images.join(round_dir(RoundKind::Final, 0));
        let lazy_pages = manifest.postcopy();
        if lazy_pages {
            // Post-copy: the daemon that will fetch the memory listens
            // before the restore hands it the tasks.
            let work = st.work.clone();
            self.lazy = Some(postcopy::LazyDestination::start(&images, &work).map_err(resumed)?);
        }
        let st = self.staging.as_mut().expect("staging exists");
        let (bundle, work) = (st.bundle.clone(), st.work.clone());
        let host = self.host.clone();
        let restore_images = images.clone();
        let restore = move || {
            let images = restore_images;
            let request = RestoreRequest { dest_id: &manifest.dest_id, bundle: &bundle, images: &images, work: &work, tcp_established: manifest.tcp_established, lazy_pages };
            let mut block = block;
            let mut handover = None;
            let restored = host.restore(&request, &mut |runc_pid| {
                let mut restorer = crate::scratch::BusiestTask::new(runc_pid);
                handover = block.take().map(|b| b.hand_over(move || restorer.seen()));
            });
            drop(handover);
            restored
        };
        // A pod sharing an IPC namespace restores one member at a time.
        let turn = self.pod.as_ref().filter(|seat| seat.shares_ipc).and_then(|seat| pods::PODS.restore_turn(&seat.pod_id));
        let my_turn = turn.as_ref().map(|t| t.lock().unwrap_or_else(|e| e.into_inner()));
        let restored = if lazy_pages {
            // The restore itself may fault on memory still on the source:
            // pages are relayed while it runs.
            std::thread::scope(|scope| {
                let restoring = scope.spawn(restore);
                let relayed = self.relay_during(|| restoring.is_finished());
                let restored = restoring.join().unwrap_or_else(|_| Err(MigrationError::Other("the restore thread panicked".into())));
                relayed.and(restored)
            })
        } else {
            restore()
        };
        drop(my_turn);
        let st = self.staging.as_mut().expect("staging exists");
        restored.map_err(|e| resumed(MigrationError::Remote(format!("restore on the destination failed: {e}"))))?;
        // The fence: CRIU left every task stopped (the bundle's CRIU
        // configuration says so); none may run before the Commit.
        let (pid, tasks) = self.host.check_stopped(&manifest.dest_id).map_err(resumed)?;
        if manifest.tcp_established {
            // The images go with the staging at the Commit: what the nudge
            // needs of them is read now.
            match container_network::nudge::connections_from_images(&images) {
                Ok(connections) => self.nudge = Some((pid, connections)),
                Err(e) => self.rep.warn(format!("the peers of the moved TCP connections will not be nudged: {e}")),
            }
        }
        // Later checkpoints of this container (runc reads the same file)
        // must not leave their tasks stopped.
        st.drop_leave_stopped().map_err(resumed)?;
        let restore_ms = restore_started.elapsed().as_millis() as u64;
        self.step(DestinationEvent::RestoredStopped).map_err(resumed)?;
        self.rep.warn(format!("restored `{}` with its {tasks} task(s) stopped; waiting for the sender's Commit", manifest.dest_id));
        failpoint!("receiver-after-restore").map_err(resumed)?;
        self.ready_sent_ms = crate::lease_guard::monotonic_ms();
        self.writer
            .write_json(MessageKind::Ready, &Ready { pid, restore_ms })
            .map_err(|e| resumed(e.into()))?;
        self.writer.flush().map_err(|e| resumed(e.into()))?;
        Ok(())
    }

    /// Waits for the sender's Commit; only once it is journalled does the
    /// copy run. Before it, anything else removes the stopped copy.
    pub(super) fn commit(&mut self, manifest: &Manifest) -> Result<(), (MigrationError, Outcome)> {
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        // Wait for the sender's Commit; anything else (an Abort, silence
        // past --timeout, a lost connection) removes the stopped copy.
        self.rep.phase(Phase::Commit);
        let postcopy = manifest.postcopy();
        let commit = if postcopy {
            // Received, with every page, by postcopy().
            failpoint!("receiver-after-ready")
        } else {
            failpoint!("receiver-after-ready").and_then(|()| self.read()).and_then(|f| Ok(f.expect(MessageKind::Commit, "Commit")?)).map(drop)
        };
        // A pod is decided once for all its members: by the first Commit,
        // or by the first failure before it.
        let journal = &self.journal;
        let record = |pod_id: &str| journal.mark_pod_committed(pod_id).is_ok();
        let commit = match (&self.pod, commit) {
            (None, commit) => commit,
            (Some(pods::PodSeat { pod_id, .. }), Ok(())) => match pods::PODS.decide(pod_id, pods::Decision::Committed, &|| record(pod_id)) {
                pods::Decision::Committed => Ok(()),
                pods::Decision::Aborted => Err(MigrationError::Aborted(format!("pod {pod_id} was aborted: another of its containers failed"))),
            },
            (Some(pods::PodSeat { pod_id, .. }), Err(e)) => match pods::PODS.decide(pod_id, pods::Decision::Aborted, &|| true) {
                pods::Decision::Committed => {
                    self.rep.warn(format!("no commit from the sender ({e}), but another container of pod {pod_id} committed it: this one is committed too"));
                    Ok(())
                }
                pods::Decision::Aborted => Err(e),
            },
        };
        if let Err(e) = commit {
            return Err(resumed(MigrationError::Aborted(format!("no commit from the sender ({e}); the restored copy was removed"))));
        }
        // Committed, journalled before anything runs: from here the copy
        // is the container, never removed by this receiver.
        self.step(DestinationEvent::CommitReceived).map_err(resumed)?;
        failpoint!("receiver-after-commit-journalled").map_err(resumed)?;
        let plan = match &self.entry.as_ref().expect("admitted").side {
            Side::Destination { plan, .. } => plan.clone(),
            Side::Source { .. } => unreachable!("a receiver's entry is a destination entry"),
        };
        if let Some(st) = self.staging.take() {
            st.commit();
        }
        // A post-copy copy runs already (and its peers were nudged then).
        if !postcopy {
            self.run_committed(&plan, manifest)?;
            self.copy_runs();
            self.nudge_peers();
        }
        self.step(DestinationEvent::Resumed).map_err(|e| (e, Outcome::SourceNotResumed))?;
        failpoint!("receiver-before-commit-ack").map_err(|e| (e, Outcome::SourceNotResumed))?;
        let _ = self.writer.write_frame(MessageKind::CommitAck, b"");
        let _ = self.writer.flush();
        self.control.shutdown();
        Ok(())
    }

    /// The copy runs: the frozen time, as this side saw it, ends.
    pub(super) fn copy_runs(&mut self) {
        self.frozen_ms = self.frozen_since.map(|t| t.elapsed().as_millis() as u64);
    }

    fn run_committed(&mut self, plan: &DestinationPlan, manifest: &Manifest) -> Result<(), (MigrationError, Outcome)> {
        self.host.run(plan, &manifest.dest_id).map_err(|e| {
            (MigrationError::Other(format!("committed, but the container could not be let run: {e}; `ctmigrate resolve` on this host retries")), Outcome::SourceNotResumed)
        })
    }

    /// The copy runs: the peers of its TCP connections, which backed off
    /// while the network was locked, are told to retransmit now. A failure
    /// only warns: the peers then recover at their own timeouts.
    pub(super) fn nudge_peers(&mut self) {
        let Some((pid, connections)) = self.nudge.take() else { return };
        if let Err(e) = failpoint!("receiver-before-nudge") {
            self.rep.warn(format!("not nudging the peers of the moved TCP connections: {e}"));
            return;
        }
        let netns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        match self.host.nudge(&netns, &connections) {
            Ok(n) => self.tcp_nudged = Some(n as u64),
            Err(e) => self.rep.warn(format!("could not nudge the peers of the moved TCP connections (they retransmit at their own timeouts): {e}")),
        }
    }
}
