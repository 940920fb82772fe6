//! `ctmigrate __guard` (hidden): the freeze guard a sender starts; see
//! migration-engine's guard module.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{exit, fail};

#[derive(clap::Args)]
pub struct GuardArgs {
    pub version: String,
    pub freezer: PathBuf,
    pub work_dir: PathBuf,
    pub journal_entry: PathBuf,
}

impl GuardArgs {
    pub fn run(self) -> ExitCode {
        match migration_engine::guard::run_guard(&self.version, self.freezer, self.work_dir, self.journal_entry) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => fail(e, exit::INTERNAL),
        }
    }
}

/// `ctmigrate __lease-guard` (hidden): the lease guard a receiver starts
/// for a post-copy copy; see migration-engine's lease_guard module.
#[derive(clap::Args)]
pub struct LeaseGuardArgs {
    pub runc: PathBuf,
    pub runtime_root: PathBuf,
    pub dest_id: String,
    pub bundle: PathBuf,
    pub until_ms: u64,
}

impl LeaseGuardArgs {
    pub fn run(self) -> ExitCode {
        match migration_engine::lease_guard::run_lease_guard(self.runc, self.runtime_root, &self.dest_id, &self.bundle, self.until_ms) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => fail(e, exit::INTERNAL),
        }
    }
}
