//! What the source side does to its host, behind one small trait: the
//! container's freezer, the network lock, CRIU's dump, the freeze guard,
//! and the source's thaw or removal. [`RealSourceHost`] acts on the
//! machine; the sequence tests (`source/tests.rs`) drive
//! [`super::Migration`] through a recording fake, with no root, CRIU or
//! runc, and check what was done to the source at each outcome.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use container_network::Netns;
use container_runtime::Freezer;
use criu_bindings::{CriuError, CriuSession, DumpOptions, NotifyAction};

use crate::guard::FreezeGuard;
use crate::journal::SourcePlan;
use crate::MigrationError;

/// Where CRIU finds its end of the page-server socket.
const PAGE_SERVER_FD: i32 = 4;

/// A CRIU dump under way in a thread of its own.
pub(crate) struct CriuRun {
    /// CRIU's process, for the freeze guard to wait on.
    pub pid: Option<u32>,
    /// Ends with CRIU's own time in milliseconds.
    pub worker: JoinHandle<Result<u64, CriuError>>,
}

pub(crate) trait SourceHost {
    fn freeze(&mut self, freezer: &Freezer, timeout: Duration) -> Result<(), MigrationError>;
    /// Drops all traffic of the container's namespace.
    fn lock_network(&mut self, netns: &Netns) -> Result<(), MigrationError>;
    fn unlock_network(&mut self, netns: &Netns) -> Result<(), MigrationError>;
    /// Starts CRIU on `dump`; with `page_server`, CRIU sends the pages over
    /// that socket (its end) instead of writing page images.
    ///
    /// `post_dump` is told when CRIU's images are complete (its post-dump
    /// notification): a lazy dump goes on serving pages after that.
    fn start_dump(&mut self, dump: DumpOptions, page_server: Option<OwnedFd>, post_dump: Option<std::sync::mpsc::Sender<()>>) -> Result<CriuRun, MigrationError>;
    /// The process that settles the migration if this one dies while the
    /// source is frozen. None where there is none to start (fakes).
    fn spawn_guard(&mut self, freezer: &Freezer, work_dir: &Path, journal_entry: &Path) -> Result<Option<FreezeGuard>, MigrationError>;
    /// Thaws the source after a failure and checks that it runs.
    fn thaw(&mut self, plan: &SourcePlan, container: &str) -> Result<(), MigrationError>;
    /// Kills and deletes the source once the destination runs it; what
    /// could not be removed, as warnings.
    fn remove(&mut self, plan: &SourcePlan, container: &str) -> Vec<String>;
}

/// The machine itself: cgroups, nftables, `criu swrk`, runc.
pub(crate) struct RealSourceHost {
    pub criu_binary: PathBuf,
    pub guard_exe: PathBuf,
}

impl SourceHost for RealSourceHost {
    fn freeze(&mut self, freezer: &Freezer, timeout: Duration) -> Result<(), MigrationError> {
        Ok(freezer.freeze(timeout)?)
    }

    fn lock_network(&mut self, netns: &Netns) -> Result<(), MigrationError> {
        container_network::lock::lock(netns).map_err(|e| MigrationError::Other(format!("cannot lock the container's network: {e}")))
    }

    fn unlock_network(&mut self, netns: &Netns) -> Result<(), MigrationError> {
        container_network::lock::unlock(netns).map_err(|e| MigrationError::Other(format!("cannot unlock the container's network {}: {e}", netns.path().display())))
    }

    fn start_dump(&mut self, mut dump: DumpOptions, page_server: Option<OwnedFd>, post_dump: Option<std::sync::mpsc::Sender<()>>) -> Result<CriuRun, MigrationError> {
        let started = Instant::now();
        let mut session = match page_server {
            Some(fd) => {
                dump.page_server_fd = Some(PAGE_SERVER_FD);
                CriuSession::start_with_fds(&self.criu_binary, vec![(PAGE_SERVER_FD, fd)])?
            }
            None => CriuSession::start(&self.criu_binary)?,
        };
        let pid = session.pid();
        // CRIU's own time is taken in its thread: the caller may be busy
        // sending a backlog when CRIU returns.
        let worker = std::thread::spawn(move || -> Result<u64, CriuError> {
            session.dump(&dump, &mut |note| {
                if note.script == "post-dump" {
                    if let Some(tx) = &post_dump {
                        let _ = tx.send(());
                    }
                }
                NotifyAction::Continue
            })?;
            if dump.pre_dump {
                session.finish_after_pre_dump()?;
            } else {
                session.finish()?;
            }
            Ok(started.elapsed().as_millis() as u64)
        });
        Ok(CriuRun { pid, worker })
    }

    fn spawn_guard(&mut self, freezer: &Freezer, work_dir: &Path, journal_entry: &Path) -> Result<Option<FreezeGuard>, MigrationError> {
        FreezeGuard::spawn(&self.guard_exe, freezer, work_dir, journal_entry).map(Some)
    }

    fn thaw(&mut self, plan: &SourcePlan, container: &str) -> Result<(), MigrationError> {
        crate::settle::thaw_source(plan, container)
    }

    fn remove(&mut self, plan: &SourcePlan, container: &str) -> Vec<String> {
        crate::settle::remove_source(plan, container)
    }
}
