//! The lease guard: a separate process on the destination that kills a
//! post-copy copy when its lease runs out, whatever became of the
//! receiver.
//!
//! During post-copy the destination's copy runs before it is committed,
//! while the source stays frozen. The source thaws after a failure only
//! once the destination said its copy is gone or the lease surely ran out
//! (see `migration_protocol::RunOnLease`). The receiver keeps the lease
//! itself, but a receiver that was killed or stopped (SIGSTOP, a hung
//! disk) cannot; this guard can. The receiver starts `ctmigrate
//! __lease-guard` just before it lets the copy run and tells it, on its
//! stdin:
//!
//! - `until <ms>`: the lease now ends at `<ms>` of CLOCK_MONOTONIC;
//! - `commit`: the receiver is about to commit: the guard answers `ok` on
//!   its stdout and exits (the copy is the container now), or `killed` if
//!   the lease had run out and it killed the copy;
//! - `removed`: the receiver removed the copy itself: exit.
//!
//! At the lease's end, or at end of file on stdin (the receiver died), the
//! guard kills the copy and removes it (container, runc state, mounts,
//! cgroups), as the receiver would have.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use container_runtime::Runc;

use crate::MigrationError;

/// The hidden subcommand that runs the guard.
pub const SUBCOMMAND: &str = "__lease-guard";

/// Now, in milliseconds of CLOCK_MONOTONIC (shared by every process of
/// the host, unlike `Instant`).
pub fn monotonic_ms() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
}

/// The receiver's handle on its lease guard.
pub struct LeaseGuard {
    child: Child,
    answers: BufReader<std::process::ChildStdout>,
}

impl LeaseGuard {
    pub fn spawn(exe: &Path, runc: &Runc, dest_id: &str, bundle: &Path, until_ms: u64) -> Result<Self, MigrationError> {
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(&runc.binary)
            .arg(&runc.root)
            .arg(dest_id)
            .arg(bundle)
            .arg(until_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(MigrationError::io("starting the lease guard"))?;
        let answers = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self { child, answers })
    }

    fn tell(&mut self, line: &str) -> bool {
        match self.child.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}").and_then(|()| stdin.flush()).is_ok(),
            None => false,
        }
    }

    /// The lease now ends at `until_ms` (CLOCK_MONOTONIC).
    pub fn extend(&mut self, until_ms: u64) {
        self.tell(&format!("until {until_ms}"));
    }

    /// Asks the guard to stand down before the commit. False if it killed
    /// the copy already (or cannot say): the copy must not be committed.
    pub fn stand_down(mut self) -> bool {
        if !self.tell("commit") {
            return false;
        }
        let mut answer = String::new();
        let ok = self.answers.read_line(&mut answer).is_ok() && answer.trim() == "ok";
        let _ = self.child.wait();
        ok
    }

    /// The receiver removed the copy itself.
    pub fn removed(mut self) {
        self.tell("removed");
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Runs the guard (in the `__lease-guard` process) until the copy is
/// committed, removed by the receiver, or killed here.
pub fn run_lease_guard(runc_binary: PathBuf, runtime_root: PathBuf, dest_id: &str, bundle: &Path, mut until_ms: u64) -> Result<(), MigrationError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: setting the disposition to SIG_IGN installs no handler code;
    // it cannot race with Rust code in this single-threaded process.
    unsafe {
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGPIPE] {
            let _ = signal(s, SigHandler::SigIgn);
        }
    }
    let _ = nix::unistd::setsid();
    let stdin = std::io::stdin();
    // Lines are split here: a buffered reader would hide what it holds
    // from poll.
    let mut pending: Vec<u8> = Vec::new();
    let why = loop {
        let line = match pending.iter().position(|b| *b == b'\n') {
            Some(at) => {
                let line: Vec<u8> = pending.drain(..=at).collect();
                String::from_utf8_lossy(&line).trim().to_string()
            }
            None => {
                let now = monotonic_ms();
                if now >= until_ms {
                    break "its lease ran out";
                }
                let wait = PollTimeout::try_from((until_ms - now).min(i32::MAX as u64) as i32).unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, wait).map_err(|e| MigrationError::Other(format!("poll: {e}")))? == 0 {
                    continue;
                }
                let mut buf = [0u8; 256];
                match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&stdin), &mut buf) {
                    Ok(0) | Err(_) => break "its receiver ended without settling it",
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                continue;
            }
        };
        match line.split_once(' ') {
            Some(("until", ms)) => until_ms = ms.parse().unwrap_or(until_ms),
            _ if line == "commit" => {
                // Still within the lease: the copy is the receiver's to commit.
                if monotonic_ms() < until_ms {
                    println!("ok");
                    return Ok(());
                }
                remove(&runc_binary, &runtime_root, dest_id, bundle, "its lease ran out");
                println!("killed");
                return Ok(());
            }
            _ if line == "removed" => return Ok(()),
            _ => {}
        }
    };
    remove(&runc_binary, &runtime_root, dest_id, bundle, why);
    Ok(())
}

fn remove(runc_binary: &Path, runtime_root: &Path, dest_id: &str, bundle: &Path, why: &str) {
    eprintln!("ctmigrate lease guard: removing the post-copy copy `{dest_id}`: {why}");
    let runc = Runc::new(runc_binary, runtime_root);
    crate::settle::remove_restored(&runc, dest_id, bundle);
    // Its network (post-copy moves no pods): the copy's hook leaves an
    // uncommitted copy's to the migration.
    let _ = container_network::DestinationNetwork::remove_for(dest_id);
    // Give a receiver that was only stopped a moment to notice, not more.
    std::thread::sleep(Duration::from_millis(10));
}
