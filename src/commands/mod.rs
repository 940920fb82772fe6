//! The subcommands: each parses its arguments (clap) into the options of
//! the library call that does the work, and turns the result into one of
//! the documented exit codes. `main` only dispatches.

pub mod certs;
pub mod check;
pub mod evacuate;
pub mod generate;
pub mod guard;
pub mod hook;
pub mod journal;
pub mod receive;
pub mod receiver_config;
pub mod send;
pub mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use migration_engine::Outcome;

/// Exit codes (documented in the README); the migration outcomes' codes
/// (3 to 6) come from [`Outcome::exit_code`].
pub mod exit {
    pub const OK: u8 = 0;
    pub const INTERNAL: u8 = 1;
    pub const USAGE: u8 = 2;
}

/// The one line a failure prints, and its exit code.
pub fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ctmigrate: error: {msg}");
    ExitCode::from(code)
}

pub fn outcome_code(o: Outcome) -> u8 {
    o.exit_code() as u8
}

/// With `--metrics ADDR`: a registry for this process's migrations, its
/// events recorded there, and the responder serving it (until dropped).
pub fn serve_metrics(
    rep: migration_engine::Reporter,
    addr: Option<&str>,
    role: migration_engine::metrics::Role,
) -> Result<(migration_engine::Reporter, Option<migration_engine::metrics::MetricsServer>), migration_engine::metrics::MetricsError> {
    let Some(addr) = addr else { return Ok((rep, None)) };
    let metrics = std::sync::Arc::new(migration_engine::metrics::Metrics::new(role));
    let server = migration_engine::metrics::serve(addr, metrics.clone())?;
    let rep = rep.with_metrics(metrics);
    rep.note(format!("metrics at http://{}/metrics", server.local_addr()));
    Ok((rep, Some(server)))
}

/// runc as `CTMIGRATE_RUNC` names it, else from PATH.
pub fn runc_binary() -> PathBuf {
    std::env::var_os("CTMIGRATE_RUNC").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runc"))
}

/// TLS options, shared by send and receive.
#[derive(clap::Args)]
pub struct SecurityArgs {
    /// Directory with ca.pem, cert.pem and key.pem (see `certs init`).
    #[arg(long, default_value = migration_engine::tls::DEFAULT_TLS_DIR)]
    pub tls_dir: PathBuf,
    /// Plain TCP: no authentication, no encryption. Both sides must agree.
    #[arg(long)]
    pub insecure: bool,
}

impl SecurityArgs {
    pub fn security(&self) -> migration_engine::tls::Security {
        if self.insecure {
            migration_engine::tls::Security::Insecure
        } else {
            migration_engine::tls::Security::Tls(self.tls_dir.clone())
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageImages {
    /// In memory (a tmpfs of the migration's own) when the images fit in
    /// half of the available memory, else on disk.
    Auto,
    Memory,
    /// In the work directory's file system.
    Disk,
}

impl From<StageImages> for migration_engine::scratch::StageMode {
    fn from(s: StageImages) -> Self {
        match s {
            StageImages::Auto => Self::Auto,
            StageImages::Memory => Self::Memory,
            StageImages::Disk => Self::Disk,
        }
    }
}

