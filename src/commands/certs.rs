//! `ctmigrate certs`: certificates for authenticated, encrypted
//! migrations.

use std::path::PathBuf;
use std::process::ExitCode;

use migration_engine::MigrationError;

use super::{exit, fail};

#[derive(clap::Subcommand)]
pub enum CertsCommand {
    /// Create a CA and, for each host, a directory to use as its --tls-dir:
    /// OUT/ca.pem, OUT/ca-key.pem (keep it safe), OUT/HOST/{ca,cert,key}.pem.
    Init {
        /// Output directory (created; nothing in it is overwritten).
        out: PathBuf,
        /// A host name or IP address senders will dial (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
}

impl CertsCommand {
    pub fn run(self) -> ExitCode {
        let CertsCommand::Init { out, hosts } = self;
        match migration_engine::tls::init_certs(&out, &hosts) {
            Ok(dirs) => {
                for d in dirs {
                    println!("{}", d.display());
                }
                ExitCode::from(exit::OK)
            }
            Err(MigrationError::Usage(m)) => fail(m, exit::USAGE),
            Err(e) => fail(e, exit::INTERNAL),
        }
    }
}
