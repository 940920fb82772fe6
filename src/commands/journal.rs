//! `ctmigrate status` and `ctmigrate resolve`: this host's migration
//! journal, and settling a migration left in doubt.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use migration_engine::journal::Journal;
use migration_engine::resolve::Keep;

use super::{exit, fail, outcome_code};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Also those that are settled (the journal keeps the newest 200).
    #[arg(long)]
    pub all: bool,
    #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ResolveArgs {
    /// The migration id (`ctmigrate status` lists them).
    pub id: String,
    /// Keep this copy and remove the other one's claim here; refused
    /// if the other host is reachable and says otherwise.
    #[arg(long, value_enum)]
    pub keep: Option<KeepCopy>,
    /// Seconds to wait for the other host's answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KeepCopy {
    Source,
    Destination,
}

impl From<KeepCopy> for Keep {
    fn from(k: KeepCopy) -> Self {
        match k {
            KeepCopy::Source => Keep::Source,
            KeepCopy::Destination => Keep::Destination,
        }
    }
}

impl StatusArgs {
    pub fn run(self) -> ExitCode {
        let journal = Journal::new(self.journal_dir);
        let (lines, damaged) = migration_engine::resolve::status(&journal, self.all);
        if self.json {
            for l in &lines {
                println!("{}", serde_json::to_string(l).unwrap_or_default());
            }
        } else if lines.is_empty() {
            println!("no migrations {}in {}", if self.all { "" } else { "in flight or in doubt " }, journal.dir().display());
        } else {
            println!("{:<18} {:<11} {:<20} {:<14} {:<9} PEER", "ID", "ROLE", "CONTAINER", "STATE", "");
            for l in &lines {
                let flag = if l.in_doubt { "IN DOUBT" } else if l.active { "active" } else { "" };
                println!("{:<18} {:<11} {:<20} {:<14} {:<9} {}", l.id, l.role, l.container, l.state, flag, l.peer);
            }
        }
        for d in &damaged {
            eprintln!("ctmigrate: warning: {d}");
        }
        ExitCode::from(exit::OK)
    }
}

impl ResolveArgs {
    pub fn run(self) -> ExitCode {
        let journal = Journal::new(self.journal_dir);
        let note = |m: &str| eprintln!("ctmigrate: {m}");
        match migration_engine::resolve::resolve(&journal, &self.id, self.keep.map(Into::into), Duration::from_secs(self.timeout), &note) {
            Ok(done) => {
                println!("{done}");
                ExitCode::from(exit::OK)
            }
            Err((e, o)) => fail(e, outcome_code(o)),
        }
    }
}
