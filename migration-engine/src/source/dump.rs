//! The frozen window: the rootfs's last pass, CRIU's final dump with its
//! pages relayed to the destination as CRIU writes them, and the wait for
//! the destination's Ready (restored, every task stopped). A failure here
//! thaws the source ([`super::rollback`]).

use super::*;

impl<'a> Migration<'a> {
    /// Rootfs delta, dump and transfer, restore on the destination.
    pub(super) fn frozen_phase(&mut self, result: &mut ResultEvent) -> Result<(), MigrationError> {
        failpoint!("sender-after-freeze")?;
        #[cfg(feature = "failpoints")]
        if corrupt_at!("sender-corrupt-wire") {
            self.p.peer.control.corrupt_next_record();
        }
        let phase_started = Instant::now();
        self.rep.phase(Phase::RootfsDelta);
        let frozen = self
            .tree
            .delta_pass(&mut self.p.peer.writer, &mut self.compressor, RootfsPhase::Frozen)
            .map_err(|e| self.explain_send_error(e))?;
        if let Some(r) = result.rootfs.as_mut() {
            r.digest = frozen.tree_digest.clone().unwrap_or_default();
            r.entries = frozen.tree_entries;
            r.frozen_entries = Some(frozen.entries);
            r.frozen_deleted = Some(frozen.deleted);
            r.frozen_tracking = Some(frozen.full_walk.clone().map(|why| format!("full walk: {why}")).unwrap_or_else(|| "inotify".into()));
        }
        let mut phases = crate::events::FrozenPhases { rootfs_delta_ms: phase_started.elapsed().as_millis() as u64, ..Default::default() };

        let phase_started = Instant::now();
        self.rep.phase(Phase::Dump);
        let final_round = result.rounds.len() as u32 + 1;
        let sizes = self.criu_round(RoundKind::Final, final_round).map_err(|e| self.explain_send_error(e))?;
        result.tmpfs_made_anew = self.tmpfs_made_anew.clone();
        result.final_bytes = Some(sizes.pages);
        result.final_relayed_bytes = Some(sizes.relayed_pages);
        result.image_bytes += sizes.images;
        self.p.peer.flush().map_err(|e| self.explain_send_error(e))?;
        phases.dump_and_transfer_ms = phase_started.elapsed().as_millis() as u64;
        phases.criu_dump_ms = sizes.criu_ms;

        let phase_started = Instant::now();
        self.rep.phase(Phase::Restore);
        self.step(SourceEvent::ImagesSent)?;
        if self.p.mode.lazy() {
            // Ready, the run on a lease and the pages, served together.
            let restore_ms = self.serve_postcopy(result)?;
            result.rootfs_verified = true;
            phases.restore_wait_ms = phase_started.elapsed().as_millis() as u64;
            phases.restore_ms = restore_ms;
            result.frozen_phases = Some(phases);
            return Ok(());
        }
        let frame = self.p.peer.read_with_timeout(self.opts.restore_timeout)?;
        let restored: Ready = frame.expect(MessageKind::Ready, "Ready")?.json()?;
        self.step(SourceEvent::Ready)?;
        // The receiver restores only after proving its rootfs equal to
        // the digest sent with the frozen pass.
        result.rootfs_verified = true;
        phases.restore_wait_ms = phase_started.elapsed().as_millis() as u64;
        phases.restore_ms = restored.restore_ms;
        result.frozen_phases = Some(phases);
        Ok(())
    }

    /// Runs CRIU in a thread while this one streams its pages (relayed
    /// from CRIU's page-server socket if `relay_pages`, else read from the
    /// page images as CRIU writes them); then sends the rest and ImagesDone.
    pub(super) fn dump_and_stream(&mut self, dump: DumpOptions, relay_pages: bool) -> Result<images::RoundBytes, MigrationError> {
        let images = dump.images_dir.clone();
        let log = self.work_dir.join(&dump.log_file);
        let pre_dump = dump.pre_dump;
        let what = if pre_dump { "pre-dump" } else { "dump" };
        let (criu_end, relay_socket) = if relay_pages {
            let (ours, theirs) = criu_bindings::page_server_socketpair(RELAY_SOCKET_BUFFER)
                .map_err(|e| MigrationError::Other(format!("creating CRIU's page-server socket: {e}")))?;
            (Some(theirs), Some(std::os::unix::net::UnixStream::from(ours)))
        } else {
            (None, None)
        };
        let CriuRun { pid, worker } = self.host.start_dump(dump, criu_end, None)?;
        if let (Some(g), Some(pid)) = (self.guard.as_mut(), pid) {
            g.watch_criu(pid);
        }
        let mut streamer = images::ImageStreamer::new(&images);
        let streamed = match &relay_socket {
            Some(socket) => {
                let relayed = self.relay_pages(&mut streamer, socket);
                if relayed.is_err() {
                    // CRIU may be blocked on the socket: make its next
                    // write fail, so that it ends.
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
                relayed
            }
            None => self.stream_image_files(&mut streamer, &worker).map_err(images::RelayError::Send),
        };
        let dumped = worker.join().map_err(|_| MigrationError::Other("the CRIU thread panicked".into()))?;
        // A failure to send is the cause when it came first (CRIU then
        // failed on the socket shut under it); one reading from CRIU is
        // CRIU's failure's effect.
        let relay_detail = match &streamed {
            Err(images::RelayError::Source(e)) => format!("; its page-server socket: {e}"),
            _ => String::new(),
        };
        let streamed = match streamed {
            Err(images::RelayError::Send(e)) => return Err(e),
            Err(images::RelayError::Source(e)) if dumped.is_ok() => {
                return Err(MigrationError::Io { context: "reading pages from CRIU's page-server socket".into(), source: e })
            }
            other => other,
        };
        let dump_ms = match dumped {
            Ok(ms) => ms,
            Err(e) => {
                let detail = container_runtime::runc::criu_log_errors(&log).map(|d| format!(": {d}")).unwrap_or_default();
                return Err(MigrationError::Other(format!("CRIU {what} failed ({e}{relay_detail}){detail}")));
            }
        };
        let pagemaps = streamed.expect("errors handled above");
        if !pre_dump {
            self.rep.phase(Phase::Transfer);
            failpoint!("sender-after-dump")?;
        }
        for (name, bytes) in pagemaps {
            streamer.send_relayed_file(&mut self.p.peer.writer, &mut self.compressor, &name, &bytes)?;
        }
        streamer.finish(&mut self.p.peer.writer, &mut self.compressor, dump_ms)
    }

    /// What the final dump should move, where that is known: all of the
    /// container's resident memory when no pre-copy round sent some of it.
    fn dump_estimate(&self) -> Option<u64> {
        (!self.p.mode.precopy_rounds()).then_some(self.p.memory_bytes)
    }

    /// Sends what the page images gain until the CRIU thread ends.
    pub(super) fn stream_image_files(
        &mut self,
        streamer: &mut images::ImageStreamer,
        worker: &std::thread::JoinHandle<Result<u64, criu_bindings::CriuError>>,
    ) -> Result<Vec<(String, Vec<u8>)>, MigrationError> {
        let mut streamed = 0u64;
        let transfer_start = Instant::now();
        while !worker.is_finished() {
            match streamer.pump(&mut self.p.peer.writer, &mut self.compressor)? {
                0 => std::thread::sleep(Duration::from_millis(2)),
                n => {
                    streamed += n;
                    self.rep.progress_of(Phase::Dump, streamed, self.dump_estimate(), transfer_start);
                }
            }
        }
        Ok(Vec::new())
    }

    /// Serves CRIU's page-server requests until it closes: each run of
    /// pages goes on to the receiver as it arrives, as part of the pages
    /// image its pagemap names. Returns the pagemap images (made here,
    /// small) to send once CRIU is done.
    pub(super) fn relay_pages(
        &mut self,
        streamer: &mut images::ImageStreamer,
        socket: &std::os::unix::net::UnixStream,
    ) -> Result<Vec<(String, Vec<u8>)>, images::RelayError> {
        use criu_bindings::page_server::{PageServerConn, PageServerRequest, RELAYED_PAGES_ID_BASE};
        use criu_bindings::pagemap::{PagemapImageBuilder, FLAG_PRESENT};
        let mut conn = PageServerConn::new(socket);
        let mut pagemaps: Vec<(String, PagemapImageBuilder)> = Vec::new();
        let mut pages_name = String::new();
        let mut streamed = 0u64;
        let transfer_start = Instant::now();
        // What CRIU sent wrong is CRIU's failure, reported with its log.
        let from_criu = |why: String| images::RelayError::Source(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        loop {
            let request = conn.next_request().map_err(|e| match e {
                criu_bindings::page_server::PageServerError::Io(e) => images::RelayError::Source(e),
                other => from_criu(other.to_string()),
            })?;
            match request {
                PageServerRequest::Open { pagemap_name } => {
                    let pages_id = RELAYED_PAGES_ID_BASE + pagemaps.len() as u32;
                    pages_name = format!("pages-{pages_id}.img");
                    for name in [&pagemap_name, &pages_name] {
                        streamer.add_relayed(name).map_err(|e| from_criu(e.to_string()))?;
                    }
                    pagemaps.push((pagemap_name, PagemapImageBuilder::new(pages_id)));
                }
                PageServerRequest::Add { vaddr, nr_pages, flags } => {
                    let (name, pagemap) = pagemaps.last_mut().expect("the connection refuses runs before an Open");
                    pagemap.push(vaddr, nr_pages, flags).map_err(|e| from_criu(format!("{name}: {e}")))?;
                    if flags & FLAG_PRESENT != 0 {
                        let len = nr_pages * 4096;
                        streamer.relay(&mut self.p.peer.writer, &mut self.compressor, &pages_name, conn.data(), len)?;
                        if streamed == 0 {
                            failpoint!("sender-during-relay").map_err(images::RelayError::Send)?;
                        }
                        streamed += len;
                        self.rep.progress_of(Phase::Dump, streamed, self.dump_estimate(), transfer_start);
                    }
                }
                PageServerRequest::Close => break,
            }
        }
        Ok(pagemaps.into_iter().map(|(name, pagemap)| (name, pagemap.into_bytes())).collect())
    }

    /// A write error usually means the receiver hung up; use its reason.
    pub(super) fn explain_send_error(&mut self, e: MigrationError) -> MigrationError {
        let broken = match &e {
            MigrationError::Protocol(migration_protocol::ProtocolError::Io(_)) | MigrationError::Io { .. } => true,
            MigrationError::Other(m) => m.contains("Broken pipe") || m.contains("reset"),
            _ => false,
        };
        if broken {
            if let Some(reason) = self.p.peer.reason_for_hangup() {
                return MigrationError::Remote(reason);
            }
        }
        e
    }
}
