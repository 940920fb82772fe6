//! The freeze guard: a separate process that thaws the source if the sender
//! dies while the source is frozen.
//!
//! The sender starts `ctmigrate __guard` just before freezing, with a pipe
//! on its stdin, and tells it what to watch:
//!
//! - `criu <pid>`: a CRIU process that is dumping the container;
//! - `netns-lock <path>`: the container's network namespace is locked;
//!   unlock it when thawing;
//! - `commit-sent`: the Commit may reach the destination: if the sender
//!   dies now the source is neither thawed nor killed until the
//!   destination says what it did (the guard asks it, as the journal
//!   entry says, see [`crate::resolve::settle_source`]);
//! - `committed`: the destination acknowledged; the source must die;
//! - `resolved`: the sender itself finished (source removed, or rolled
//!   back): exit quietly.
//!
//! If the pipe reaches end of file without `resolved` (the sender was
//! killed, crashed or lost its terminal), the guard lets each CRIU it was
//! told of finish (CRIU notices its client is gone; killing it mid-dump
//! could leave its parasite in a task), then thaws the cgroup, after
//! killing its tasks if the migration had committed. The guard
//! runs in its own session and ignores SIGINT, SIGTERM and SIGHUP, so the
//! Ctrl-C that stops the sender does not stop it.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use container_runtime::cgroup::CgroupVersion;
use container_runtime::{procinfo, Freezer};

use crate::journal::{Journal, Side};
use crate::MigrationError;
use migration_protocol::SourceState;

/// The hidden subcommand that runs the guard.
pub const SUBCOMMAND: &str = "__guard";

/// Longest wait for a CRIU dump to end on its own before it is killed.
const CRIU_GRACE: Duration = Duration::from_secs(300);

/// The sender's handle on its guard.
pub struct FreezeGuard {
    child: Child,
}

impl FreezeGuard {
    /// `work_dir` (images and logs) is removed if the guard has to act.
    /// `journal_entry` is the migration's journal file, for settling it.
    pub fn spawn(exe: &Path, freezer: &Freezer, work_dir: &Path, journal_entry: &Path) -> Result<Self, MigrationError> {
        let version = match freezer.version {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        };
        let child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(version)
            .arg(&freezer.path)
            .arg(work_dir)
            .arg(journal_entry)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(MigrationError::io("starting the freeze guard"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tell(&mut self, line: &str) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    pub fn watch_netns_lock(&mut self, netns: &Path) {
        self.tell(&format!("netns-lock {}", netns.display()));
    }

    pub fn watch_criu(&mut self, pid: u32) {
        self.tell(&format!("criu {pid}"));
    }

    /// Post-copy: the destination's copy may run on a lease of `ms`: if
    /// the sender dies now, the thaw waits until the lease has run out.
    pub fn lease(&mut self, ms: u64) {
        self.tell(&format!("lease {ms}"));
    }

    /// The Commit may go out: if the sender dies now, the destination's
    /// word decides.
    pub fn commit_sent(&mut self) {
        self.tell("commit-sent");
    }

    /// The destination owns the container: if the sender dies now, the
    /// source must be killed, not thawed.
    pub fn committed(&mut self) {
        self.tell("committed");
    }

    /// The sender has settled the source's fate itself.
    pub fn resolved(mut self) {
        self.tell("resolved");
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Runs the guard (in the `__guard` process). Returns when there is
/// nothing left to guard.
pub fn run_guard(version: &str, freezer_path: PathBuf, work_dir: PathBuf, journal_entry: PathBuf) -> Result<(), MigrationError> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: setting the disposition to SIG_IGN installs no handler code;
    // it cannot race with Rust code in this single-threaded process.
    unsafe {
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            let _ = signal(s, SigHandler::SigIgn);
        }
    }
    let _ = nix::unistd::setsid();
    let freezer = Freezer {
        path: freezer_path,
        version: if version == "v2" { CgroupVersion::V2 } else { CgroupVersion::V1 },
    };
    let mut criu_pids = Vec::new();
    let mut committed = false;
    let mut commit_sent = false;
    let mut locked_netns = None;
    let mut lease_ms = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.split_once(' ') {
            Some(("criu", pid)) => criu_pids.extend(pid.trim().parse::<i32>().ok()),
            Some(("lease", ms)) => lease_ms = ms.trim().parse::<u64>().ok(),
            Some(("netns-lock", path)) => locked_netns = Some(PathBuf::from(path.trim())),
            _ if line.trim() == "committed" => committed = true,
            _ if line.trim() == "commit-sent" => commit_sent = true,
            _ if line.trim() == "resolved" => return Ok(()),
            _ => {}
        }
    }
    if commit_sent && !committed {
        // CRIU is done by now (the images were all sent).
        crate::scratch::remove_work_dir(&work_dir);
        return settle_in_doubt(&journal_entry);
    }
    eprintln!(
        "ctmigrate guard: the sender ended without settling the migration; {} {}",
        if committed { "killing (it was committed) and thawing" } else { "thawing" },
        freezer.path.display()
    );
    if let (Some(ms), false) = (lease_ms, committed) {
        // Post-copy: the destination's copy ran on a lease no one renews
        // now; its receiver kills it once the lease runs out.
        let wait = crate::source::lease_wait(ms);
        eprintln!("ctmigrate guard: the destination's copy ran on a {ms} ms lease; thawing in {} ms", wait.as_millis());
        std::thread::sleep(wait);
    }
    // CRIU must be done before the thaw: a dump still running when the
    // cgroup is thawed puts the freezer back as it found it (frozen) when
    // it ends. Its pid may not have reached us (the sender died right
    // after starting it): a task it is dumping names it as its tracer.
    let deadline = Instant::now() + CRIU_GRACE;
    let thawed = loop {
        for pid in criu_pids.iter().copied().chain(tracers_of(&freezer)) {
            while procinfo::exists(pid) && is_criu(pid) {
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if committed {
            // A frozen task dies of SIGKILL as soon as it thaws.
            for pid in freezer.pids() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let thawed = freezer.thaw();
        // Thawed, and staying so: no CRIU took the tasks meanwhile.
        std::thread::sleep(Duration::from_millis(300));
        let settled = tracers_of(&freezer).is_empty() && matches!(freezer.state(), Ok(container_runtime::FreezerState::Thawed));
        if settled || thawed.is_err() || Instant::now() > deadline {
            break thawed;
        }
    };
    // A committed source goes whole, as the sender would have removed it:
    // runtime state, interfaces, a named namespace.
    if committed {
        if let Ok(entry) = Journal::read(&journal_entry) {
            if let Side::Source { plan, .. } = &entry.side {
                for w in crate::settle::remove_source(plan, &entry.container) {
                    eprintln!("ctmigrate guard: {w}");
                }
            }
        }
    }
    // A resumed source gets its network back; a committed one keeps the
    // lock until its namespace goes.
    if let (Some(path), false) = (locked_netns, committed) {
        let netns = container_network::Netns::Path(path);
        // The sender is told to lock before it does: killed while its
        // `nft` ran, that child may still add the lock after this first
        // unlock. It has finished well before the second.
        for pass in 0..2 {
            if pass > 0 {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            if let Err(e) = container_network::lock::unlock(&netns) {
                eprintln!("ctmigrate guard: cannot unlock the container's network: {e}");
            }
        }
    }
    // CRIU has exited: its images and logs are no one's now.
    crate::scratch::remove_work_dir(&work_dir);
    journal_end(&journal_entry, if committed { SourceState::Migrated } else if thawed.is_ok() { SourceState::Resumed } else { SourceState::NotResumed });
    thawed?;
    Ok(())
}

/// Records how the guard ended the migration, if it has a journal entry.
fn journal_end(journal_entry: &Path, state: SourceState) {
    let Some(dir) = journal_entry.parent() else { return };
    if let Ok(mut entry) = Journal::read(journal_entry) {
        entry.owner_pid = std::process::id();
        entry.set_source_state(state);
        if let Err(e) = Journal::new(dir).write(&entry) {
            eprintln!("ctmigrate guard: cannot journal the outcome: {e}");
        }
    }
}

/// The sender died after deciding to commit: the source stays frozen
/// while the guard asks the destination what it did, and acts on that.
fn settle_in_doubt(journal_entry: &Path) -> Result<(), MigrationError> {
    let dir = journal_entry.parent().unwrap_or(Path::new("."));
    let journal = Journal::new(dir);
    let mut entry = Journal::read(journal_entry).map_err(|e| MigrationError::Other(e.to_string()))?;
    entry.owner_pid = std::process::id();
    let Side::Source { plan, .. } = &entry.side else {
        return Err(MigrationError::Other(format!("{} is not a source entry", journal_entry.display())));
    };
    let limits = crate::resolve::AskLimits {
        io: Duration::from_millis(plan.io_timeout_ms),
        total: Duration::from_millis(plan.in_doubt_timeout_ms),
    };
    eprintln!("ctmigrate guard: the sender ended after its Commit; asking the destination what it did (the source stays frozen)");
    let (fate, last) = crate::resolve::settle_source(&journal, &mut entry, limits, &|m: &str| eprintln!("ctmigrate guard: {m}"));
    eprintln!("ctmigrate guard: migration {}: {fate:?} ({last})", entry.id);
    Ok(())
}

/// The processes tracing a task of `freezer`'s cgroup (a CRIU dumping it).
fn tracers_of(freezer: &Freezer) -> Vec<i32> {
    let mut tracers: Vec<i32> = freezer
        .pids()
        .into_iter()
        .filter_map(|pid| procinfo::status(pid).map(|s| s.tracerpid).filter(|t| *t != 0))
        .collect();
    tracers.sort_unstable();
    tracers.dedup();
    tracers
}

fn is_criu(pid: i32) -> bool {
    procinfo::cmdline(pid).is_some_and(|args| args.first().is_some_and(|a| a.ends_with(b"criu")))
}
