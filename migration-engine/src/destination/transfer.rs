//! The transfer: rootfs passes and image rounds as the sender sends them,
//! each image verified against the sender's list, pre-dump rounds folded
//! into the first, and the frozen pass's rootfs verified before anything
//! runs. A failure here removes the staged copy; the source is thawed.

use super::*;
use migration_protocol::transfer::{TransferError, TransferOrder};

impl<'a> Session<'a> {
    /// Rootfs passes and image rounds, in whatever order the sender sends
    /// them; then the rootfs verified. Nothing runs from a rootfs that is
    /// not the source's.
    pub(super) fn transfer(&mut self, manifest: &Manifest, result: &mut ResultEvent) -> Result<(), (MigrationError, Outcome)> {
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        self.rep.phase(Phase::Transfer);
        let (done, rootfs_check) = self.receive_state(manifest.max_rounds).map_err(resumed)?;
        result.image_bytes = done.files.iter().map(|f| f.size).sum();
        // Nothing runs from a rootfs that is not the source's.
        let wait_started = Instant::now();
        let verified = rootfs_check
            .join()
            .map_err(|_| resumed(MigrationError::Other("the rootfs verification thread panicked".into())))?
            .map_err(resumed)?;
        result.rootfs_verified = true;
        result.rootfs = Some(crate::events::RootfsReport {
            digest: verified.digest,
            entries: verified.entries,
            verify_ms: Some(verified.took.as_millis() as u64),
            verify_wait_ms: Some(wait_started.elapsed().as_millis() as u64),
            ..Default::default()
        });
        failpoint!("receiver-before-restore").map_err(resumed)?;
        if corrupt_at!("receiver-before-restore") {
            // As a disk that lost a file after it was verified: CRIU's
            // restore fails for real, with a log to keep.
            let st = self.staging.as_ref().expect("staging exists");
            let _ = std::fs::remove_file(st.images.join(round_dir(RoundKind::Final, 0)).join("inventory.img"));
        }

        Ok(())
    }

    /// Reads rootfs passes and rounds of images until the final round's
    /// ImagesDone, verified. Pre-dump rounds are acknowledged one by one.
    /// Returns the final round's file list.
    pub(super) fn receive_state(&mut self, max_rounds: u32) -> Result<(ImagesDone, RootfsCheck), MigrationError> {
        let st = self.staging.as_ref().expect("staging exists");
        let (rootfs_dir, images_dir) = (st.bundle.join("rootfs"), st.images.clone());
        let mut tree = rootfs::Applier::new(&rootfs_dir, self.opts.unpack.clone())?;
        // The frozen pass's verification, run while the images arrive.
        let mut check: Option<RootfsCheck> = None;
        let mut order = TransferOrder::new(max_rounds.min(crate::source::MAX_ITERATIONS));
        let mut sink: Option<ImageSink> = None;
        let mut first_image = true;
        let since = Instant::now();
        let bad = |e: TransferError| MigrationError::BadStream(e.to_string());
        loop {
            let frame = self.read()?;
            match frame.kind {
                MessageKind::RootfsEntry
                | MessageKind::RootfsFileData
                | MessageKind::RootfsFileEnd
                | MessageKind::RootfsDelete
                | MessageKind::RootfsEnd => {
                    order.rootfs_record().map_err(bad)?;
                    let pass_began = Instant::now();
                    let (end, bytes) = tree.receive_pass(&mut self.reader, frame)?;
                    self.sink_bytes += bytes;
                    if end.phase == RootfsPhase::Frozen {
                        // The sender froze the source just before this
                        // pass's first record.
                        self.frozen_since = Some(pass_began);
                        // The source is frozen: this session's work comes
                        // before that of migrations whose source runs.
                        if let Some(bg) = self.background.as_mut() {
                            bg.foreground();
                        }
                        order.frozen_pass_ended();
                        check = Some(rootfs::verify::start(&mut tree, end));
                    }
                }
                MessageKind::RoundBegin => {
                    let begin: RoundBegin = frame.json()?;
                    let parent = order.begin_round(begin).map_err(bad)?;
                    let dir = images_dir.join(round_dir(begin.kind, begin.round));
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dir)
                        .map_err(MigrationError::io(format!("creating {}", dir.display())))?;
                    // The parent link is ours to make: CRIU follows it to
                    // the previous round's pages.
                    if let Some(parent) = parent {
                        let parent = format!("../{}", round_dir(RoundKind::PreDump, parent));
                        std::os::unix::fs::symlink(parent, dir.join("parent"))
                            .map_err(MigrationError::io("linking the parent images"))?;
                    }
                    let reserve = self.staging.as_mut().and_then(|st| st.reserve.take());
                    sink = Some(ImageSink::new(&dir, self.opts.max_image_files, self.opts.max_image_file).with_reserve(reserve));
                }
                MessageKind::ImageData => {
                    order.image_data().map_err(bad)?;
                    let sink = sink.as_mut().expect("a round is open");
                    self.sink_bytes += sink.write_frame(&frame)? as u64;
                    self.reader.recycle(frame);
                    self.rep.progress(Phase::Transfer, self.sink_bytes, since);
                    if std::mem::take(&mut first_image) {
                        failpoint!("receiver-during-images")?;
                    }
                }
                MessageKind::ImagesDone => {
                    let begin = order.end_round().map_err(bad)?;
                    let mut sink = sink.take().expect("a round was open");
                    let done: ImagesDone = frame.json()?;
                    sink.verify(&done)?;
                    if let Some(st) = self.staging.as_mut() {
                        st.reserve = sink.take_reserve();
                    }
                    if begin.kind == RoundKind::Final {
                        return Ok((done, check.expect("the frozen pass ended before the final round")));
                    }
                    let bytes = done.files.iter().map(|f| f.size).sum();
                    if let Some(m) = self.rep.metrics() {
                        m.precopy_round(crate::metrics::Role::Receiver);
                    }
                    failpoint!("receiver-after-round")?;
                    self.writer.write_json(MessageKind::RoundDone, &RoundDone { round: begin.round, bytes })?;
                    self.writer.flush()?;
                    // While the sender's next round runs.
                    if order.wants_fold(begin.round) {
                        let folded = self.fold_round(&images_dir, begin.round);
                        order.folded(begin.round, folded);
                    }
                }
                other => {
                    return Err(ProtocolError::UnexpectedMessage { expected: "rootfs or image data", got: other }.into())
                }
            }
        }
    }

    /// Folds pre-dump round `round` into round 1 and removes it; false (and
    /// nothing changed for the restore) if it cannot be folded.
    pub(super) fn fold_round(&mut self, images_dir: &Path, round: u32) -> bool {
        let later = images_dir.join(round_dir(RoundKind::PreDump, round));
        let outcome = criu_bindings::pagemap::fold_into_base(&images_dir.join(round_dir(RoundKind::PreDump, 1)), &later);
        let (folded_bytes, kept_because) = match outcome {
            Ok(criu_bindings::pagemap::Fold::Folded { bytes }) => (Some(bytes), None),
            Ok(criu_bindings::pagemap::Fold::NotFoldable(why)) => (None, Some(why)),
            // The chain is still whole (round 1 only ever receives newer
            // copies of its own pages): CRIU will read it as it is.
            Err(e) => (None, Some(e.to_string())),
        };
        let folded = folded_bytes.is_some();
        self.rep.emit(Event::RoundFold { round, folded_bytes, kept_because });
        if folded {
            // Only memory if it stays: nothing links to it any more.
            let _ = std::fs::remove_dir_all(&later);
        }
        folded
    }
}
