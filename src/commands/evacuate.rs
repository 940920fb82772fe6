//! `ctmigrate evacuate`: move every running container of a runtime root
//! (and `send ID...`: the named ones), several at once; see the engine's
//! `evacuate` module.

use std::process::ExitCode;

use migration_engine::evacuate::{evacuate, summary_lines, EvacuateOptions};
use migration_engine::MigrationError;

use super::send::MigrationArgs;
use super::{exit, fail};

#[derive(clap::Args)]
pub struct EvacuateArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
}

/// How several migrations share the host: `evacuate`, and `send` with
/// several containers.
#[derive(clap::Args)]
pub struct FleetArgs {
    /// With several containers: most moved at once (a pod counts once;
    /// default from this host's cores and memory).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: Option<u16>,
    /// With several containers: most frozen at once (the others wait for
    /// a slot, still running; default: one per two cores). A pod takes
    /// none.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_frozen: Option<u16>,
}

impl EvacuateArgs {
    pub fn run(self) -> ExitCode {
        run_evacuation(self.migration, None, &self.fleet)
    }
}

/// Moves `containers` (None: every running one), prints the summary
/// (text on standard output, or the `summary` event with --json) and
/// exits 0 when every container moved, else with the most serious of
/// their outcomes' codes.
pub fn run_evacuation(migration: MigrationArgs, containers: Option<Vec<String>>, fleet: &FleetArgs) -> ExitCode {
    let parallel = fleet.parallel.map(usize::from).unwrap_or_else(migration_engine::evacuate::default_parallel);
    let max_frozen = fleet.max_frozen;
    let json = migration.json;
    let (rep, _metrics) = match migration.reporter() {
        Ok(served) => served,
        Err(code) => return code,
    };
    // A signal stops what is in flight (each rolls back) and starts
    // nothing more; the summary still comes.
    migration_engine::interrupt::stop_cleanly();
    let opts = EvacuateOptions { send: migration.options(String::new(), None), containers, parallel, freeze_slots: max_frozen.map(|n| migration_engine::evacuate::FreezeSlots::new(n.into())) };
    match evacuate(&opts, &rep) {
        Ok(summary) => {
            if !json {
                for line in summary_lines(&summary) {
                    println!("{line}");
                }
            }
            ExitCode::from(summary.exit_code as u8)
        }
        Err(e) => {
            let code = match e {
                MigrationError::Usage(_) => exit::USAGE,
                _ => migration_engine::Outcome::NothingTouched.exit_code() as u8,
            };
            fail(e, code)
        }
    }
}
