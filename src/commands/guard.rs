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
