//! Fault injection for tests: `CTMIGRATE_FAILPOINTS=name=action[,name=action]`.
//!
//! Only in builds with the `failpoints` feature (the workspace's test
//! builds): elsewhere the [`failpoint!`](crate::failpoint) and
//! [`corrupt_at!`](crate::corrupt_at) macros at the named places expand to
//! nothing, and a release binary holds none of these names.
//!
//! A name may be scoped to one container's migration, `name@ID=action`:
//! it then acts only in the thread migrating container `ID` (the sender's,
//! or the receiver's session whose destination id is `ID`), so that a
//! test can fail one migration of several in one process (`evacuate`).
//!
//! Actions: `error` (the step fails as if it had failed for real), `exit`
//! (the process dies on the spot, as if killed), `sleep:MS` (stall), and
//! `corrupt` (the step damages the data it sends). Only tests set the
//! variable; every failpoint is a named place in the code, listed here:
//!
//! | name | where |
//! |---|---|
//! | `sender-after-freeze` | sender, right after the cgroup froze |
//! | `sender-before-commit` | sender, after the destination restored, before Commit |
//! | `sender-corrupt-image` | sender, one image chunk altered after its checksum |
//! | `sender-corrupt-wire` | sender, one byte of the first TLS record sent after the freeze flipped |
//! | `sender-during-relay` | sender, after the first run of pages CRIU handed over its page-server socket |
//! | `sender-after-dump` | sender, CRIU done, before the last images go out |
//! | `receiver-after-manifest` | receiver, after accepting the manifest |
//! | `receiver-during-images` | receiver, after the first image chunk |
//! | `receiver-before-restore` | receiver, with all images received (`corrupt`: the final images' inventory.img removed, so that CRIU's restore fails) |
//! | `receiver-after-restore` | receiver, restored with every task stopped, before Ready |
//! | `receiver-after-ready` | receiver, Ready sent, before reading the Commit |
//! | `receiver-after-commit-journalled` | receiver, Commit journalled, before the copy runs |
//! | `receiver-before-nudge` | receiver, the committed copy runs, before its TCP peers are nudged (`error`: they are not) |
//! | `receiver-before-commit-ack` | receiver, the committed copy runs, before CommitAck |
//! | `sender-after-commit-journalled` | sender, commit-sent journalled, before the Commit is written |
//! | `sender-after-commit` | sender, Commit written, before reading the CommitAck |
//! | `sender-rootfs-mid-file` | sender, initial rootfs pass, after the first chunk of the first file larger than a chunk |
//! | `sender-rootfs-unsent-change` | sender, frozen rootfs pass: the tree digest covers a change no record carried (`corrupt`) |
//! | `sender-after-round` | sender, after a pre-copy round was acknowledged |
//! | `receiver-after-round` | receiver, after verifying a pre-copy round, before RoundDone |

#![cfg(feature = "failpoints")]

use std::time::Duration;

use crate::MigrationError;

pub const ENV: &str = "CTMIGRATE_FAILPOINTS";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Error,
    Exit,
    Sleep(Duration),
    Corrupt,
}

thread_local! {
    static SCOPE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The container this thread migrates, for scoped failpoints.
pub fn set_scope(container: &str) {
    SCOPE.with(|s| *s.borrow_mut() = Some(container.to_string()));
}

/// The action configured for `name`, if any.
pub fn action(name: &str) -> Option<Action> {
    let spec = std::env::var(ENV).ok()?;
    spec.split(',').find_map(|item| {
        let (n, a) = item.split_once('=')?;
        let (n, scope) = match n.split_once('@') {
            Some((n, scope)) => (n, Some(scope.trim())),
            None => (n, None),
        };
        if n.trim() != name {
            return None;
        }
        if let Some(scope) = scope {
            if !SCOPE.with(|s| s.borrow().as_deref() == Some(scope)) {
                return None;
            }
        }
        let a = a.trim();
        Some(match a {
            "error" => Action::Error,
            "exit" => Action::Exit,
            "corrupt" => Action::Corrupt,
            _ => Action::Sleep(Duration::from_millis(a.strip_prefix("sleep:")?.parse().ok()?)),
        })
    })
}

/// Runs the failpoint `name`: fails, exits or stalls as configured.
/// (`corrupt` is for [`should_corrupt`] and does nothing here.)
pub fn hit(name: &str) -> Result<(), MigrationError> {
    match action(name) {
        None | Some(Action::Corrupt) => Ok(()),
        Some(Action::Error) => Err(MigrationError::Injected(name.to_string())),
        Some(Action::Exit) => {
            eprintln!("ctmigrate: failpoint {name}: exiting abruptly");
            // SIGKILL ourselves: no destructors, no cleanup, as a crash.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
            std::process::abort();
        }
        Some(Action::Sleep(d)) => {
            std::thread::sleep(d);
            Ok(())
        }
    }
}

pub fn should_corrupt(name: &str) -> bool {
    action(name) == Some(Action::Corrupt)
}
