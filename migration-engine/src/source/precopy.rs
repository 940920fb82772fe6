//! Pre-copy: the work directory, and CRIU's pre-dump rounds while the
//! container runs (where the kernel tracks dirty memory); when to stop is
//! [`crate::precopy`]'s policy. A failure here touches nothing.

use super::*;

impl<'a> Migration<'a> {
    pub(super) fn prepare_work_dir(&mut self) -> Result<(), MigrationError> {
        use std::os::unix::fs::DirBuilderExt;
        let images = self.work_dir.join("images");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&images)
            .map_err(MigrationError::io(format!("creating {}", images.display())))?;
        if let Some(size) = crate::scratch::memory_stage_size(self.opts.stage_images, self.p.memory_bytes) {
            crate::scratch::mount_tmpfs(&images, size)?;
            // Only pre-copy rounds write pages here; a stop-copy dump's
            // are relayed (see criu_round).
            if self.p.mode.precopy_rounds() {
                self.reserve = Some(crate::scratch::Reserve::create(&images, self.p.memory_bytes)?);
            }
        }
        Ok(())
    }

    /// Pre-dump rounds until the convergence rule says stop, each followed
    /// by the rootfs's changes.
    pub(super) fn precopy(&mut self, result: &mut ResultEvent) -> Result<(), MigrationError> {
        self.rep.phase(Phase::Precopy);
        let rule = Convergence {
            downtime_target_ms: self.opts.downtime_target.as_millis() as u64,
            max_iterations: self.opts.max_iterations,
        };
        let mut rounds: Vec<RoundReport> = Vec::new();
        for round in 1..=self.opts.max_iterations {
            let started = Instant::now();
            let sizes = self.criu_round(RoundKind::PreDump, round)?;
            result.image_bytes += sizes.images;
            let bytes = sizes.pages;
            // Keep the destination's rootfs close, so the frozen delta is small.
            self.tree.delta_pass(&mut self.p.peer.writer, &mut self.compressor, RootfsPhase::Delta)?;
            self.p.peer.flush()?;
            let done: RoundDone = self.p.peer.read_with_timeout(self.opts.io_timeout)?.expect(MessageKind::RoundDone, "RoundDone")?.json()?;
            if done.round != round || done.bytes < bytes {
                return Err(MigrationError::Other(format!(
                    "the receiver acknowledged round {} with {} bytes; round {round} sent {bytes}",
                    done.round, done.bytes
                )));
            }
            self.step(SourceEvent::RoundDone(round))?;
            let report = RoundReport::new(round, "pre-dump", bytes, started.elapsed(), &rounds);
            self.rep.emit(Event::Round(report.clone()));
            rounds.push(report);
            failpoint!("sender-after-round")?;
            if let Some(reason) = rule.stop_after(&rounds) {
                self.rep.emit(Event::PrecopyStop { rounds: round, reason, detail: reason.describe() });
                result.stop_reason = Some(reason);
                break;
            }
        }
        result.rounds = rounds;
        Ok(())
    }

    /// One CRIU run (a pre-dump round, or the final dump) into its own
    /// images directory, streamed as CRIU writes.
    pub(super) fn criu_round(&mut self, kind: RoundKind, round: u32) -> Result<images::RoundBytes, MigrationError> {
        use std::os::unix::fs::DirBuilderExt;
        let images = self.work_dir.join("images");
        let dir = images.join(round_dir(kind, round));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(MigrationError::io(format!("creating {}", dir.display())))?;
        let parent = (round > 1).then(|| format!("../{}", round_dir(RoundKind::PreDump, round - 1)));
        // CRIU's writes reuse the memory the reserve held (sent pages are
        // punched out after that, so later writes reuse those).
        self.reserve = None;
        self.p.peer.writer.write_json(MessageKind::RoundBegin, &RoundBegin { round, kind })?;
        let plan = &self.p.plan;
        let mut dump = DumpOptions {
            images_dir: dir.clone(),
            work_dir: Some(self.work_dir.clone()),
            log_file: format!("{}.log", round_dir(kind, round)),
            pid: plan.pid,
            root: Some(plan.root.clone()),
            leave_running: true,
            manage_cgroups: true,
            freeze_cgroup: Some(plan.freezer.path.clone()),
            external: plan.external_namespaces.clone(),
            file_locks: true,
            track_mem: self.p.mode.precopy_rounds(),
            parent_images: parent.clone(),
            ..Default::default()
        };
        // A dump with no parent sends its pages over CRIU's page-server
        // socket to this process, which relays them: they are never
        // written to this host's images directory and read back. Rounds
        // with a parent keep files (CRIU checks the parent's images there).
        let relay_pages = kind == RoundKind::Final && parent.is_none();
        match kind {
            RoundKind::PreDump => dump.pre_dump = true,
            RoundKind::Final => {
                // Mounts, stdio and connections matter only to the dump
                // that is restored.
                dump.ext_mounts = plan.ext_mounts.clone();
                // Empty now, with every task frozen: the receiver's new
                // tmpfs is the same thing, and CRIU runs no tar for it.
                for (index, tmpfs) in plan.empty_tmpfs.iter().enumerate() {
                    if tmpfs.still_empty(plan.pid) {
                        dump.ext_mounts.push(ExternalMount { key: tmpfs.mountpoint.clone(), val: EmptyTmpfs::external_key(index) });
                        self.tmpfs_made_anew.push(tmpfs.mountpoint.clone());
                    }
                }
                dump.tcp_established = self.opts.tcp_established;
                // nftables: CRIU keeps its lock in one table of its own and
                // deletes it whole; the iptables method leaves empty
                // filter tables behind in the container's namespace.
                dump.network_lock = Some(criu_bindings::NetworkLock::Nftables);
                std::fs::write(dir.join("descriptors.json"), &plan.descriptors_json)
                    .map_err(MigrationError::io("writing descriptors.json"))?;
            }
        }
        if kind == RoundKind::Final && self.p.mode.lazy() {
            return self.lazy_dump_and_stream(dump);
        }
        self.dump_and_stream(dump, relay_pages)
    }
}
