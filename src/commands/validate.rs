//! `ctmigrate validate`: one whole migration between two local
//! network-namespace hosts (the `migration-testbed` crate).

use std::process::ExitCode;

use clap::ValueEnum;
use migration_engine::events::Reporter;
use migration_testbed::validate;

use super::{exit, fail};

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// What to migrate: the busybox counter, or a real service in a
    /// Debian rootfs under a client that checks every answer (the
    /// rootfs is built by mmdebstrap on first use, about a minute, and
    /// cached in /var/cache/ctmigrate/rootfs).
    #[arg(long, value_enum, default_value = "counter")]
    pub workload: ValidateWorkload,
    #[arg(long)]
    pub json: bool,
}

/// What `validate` migrates.
#[derive(Clone, Copy, ValueEnum)]
pub enum ValidateWorkload {
    /// The busybox counter fixture.
    Counter,
    /// Redis with a million keys, a client doing SET/GET on one connection.
    Redis,
    /// nginx with www-data workers, a keep-alive client checking each
    /// download's SHA-256.
    Nginx,
    /// PostgreSQL 15 under pgbench (4 clients).
    Postgres,
}

impl From<ValidateWorkload> for validate::ValidateWorkload {
    fn from(w: ValidateWorkload) -> Self {
        match w {
            ValidateWorkload::Counter => Self::Counter,
            ValidateWorkload::Redis => Self::Redis,
            ValidateWorkload::Nginx => Self::Nginx,
            ValidateWorkload::Postgres => Self::Postgres,
        }
    }
}

impl ValidateArgs {
    pub fn run(self) -> ExitCode {
        let rep = Reporter::new(self.json);
        let opts = validate::ValidateOptions { workload: self.workload.into() };
        match validate::run(&opts, &rep) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => fail(e, exit::INTERNAL),
        }
    }
}
