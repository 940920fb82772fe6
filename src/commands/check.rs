//! `ctmigrate check`: can this host send and receive migrations?

use std::path::PathBuf;
use std::process::ExitCode;

use migration_engine::{check, Outcome};

use super::{exit, outcome_code, runc_binary};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// runc's state root.
    #[arg(long, default_value = "/run/runc")]
    pub runtime_root: PathBuf,
    #[arg(long)]
    pub json: bool,
}

impl CheckArgs {
    pub fn run(self) -> ExitCode {
        let report = check::run(&check::CheckOptions {
            runtime_root: self.runtime_root,
            runc_binary: runc_binary(),
            criu_binary: migration_engine::criu_binary(),
        });
        report.print(self.json);
        if report.ok() {
            ExitCode::from(exit::OK)
        } else {
            ExitCode::from(outcome_code(Outcome::NothingTouched))
        }
    }
}
