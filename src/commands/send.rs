//! `ctmigrate send`: migrate running containers to a receiver; one
//! container alone, or several at once (see `evacuate`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use migration_engine::events::Reporter;
use migration_engine::metrics::Role;
use migration_engine::precopy::ModeRequest;
use migration_engine::transport::Destination;
use migration_engine::{MigrationError, SendOptions};
use migration_protocol::CompressionMode;

use super::{exit, fail, outcome_code, runc_binary, SecurityArgs, StageImages};

#[derive(clap::Args)]
pub struct SendArgs {
    /// Ids of the containers in the runtime; several move at once, those
    /// sharing a network namespace as one pod.
    #[arg(required = true, value_name = "CONTAINER")]
    pub containers: Vec<String>,
    /// Id of the container on the destination (default: the same id);
    /// only with one container.
    #[arg(long)]
    pub dest_id: Option<String>,
    #[command(flatten)]
    pub fleet: super::evacuate::FleetArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
}

/// How each migration runs: `send` and `evacuate` share these.
#[derive(clap::Args)]
pub struct MigrationArgs {
    /// Destination: tcp://HOST:PORT of a `ctmigrate receive`.
    #[arg(long, value_parser = |s: &str| s.parse::<Destination>())]
    pub to: Destination,
    /// runc's state root on this host.
    #[arg(long, default_value = "/run/runc")]
    pub runtime_root: PathBuf,
    /// Compress chunks with zstd: auto sends a chunk compressed only if
    /// that saves at least 10%.
    #[arg(long, value_enum, default_value = "auto")]
    pub compress: Compress,
    /// Directory for CRIU's images and logs (root-only, removed after).
    #[arg(long, default_value = migration_engine::DEFAULT_WORK_ROOT)]
    pub work_dir: PathBuf,
    /// Seconds to wait for the receiver at any step but restore.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Seconds to wait for the destination to restore the container.
    #[arg(long, default_value_t = 300)]
    pub restore_timeout: u64,
    /// Migration mode.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Most pre-copy rounds before the final freeze (1 to 32).
    #[arg(long, default_value_t = 8)]
    pub max_iterations: u32,
    /// Frozen time, in milliseconds, pre-copy aims for.
    #[arg(long, default_value_t = 300)]
    pub downtime_target: u64,
    /// Let `--mode auto` choose post-copy (or hybrid). Post-copy runs the
    /// container on the destination before its memory arrived; if the
    /// migration then fails, the source resumes from the moment it froze
    /// and what the destination's copy did meanwhile is lost.
    #[arg(long)]
    pub allow_postcopy: bool,
    /// Milliseconds the destination's post-copy copy may run without
    /// hearing from the source (500 to 60000); a failed post-copy thaws
    /// the source after this plus 2 s, unless the destination confirms it
    /// removed its copy sooner.
    #[arg(long, default_value_t = 4000)]
    pub postcopy_lease: u64,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Where to append one JSON line per migration.
    #[arg(long, default_value = migration_engine::audit::DEFAULT_AUDIT_LOG)]
    pub audit_log: PathBuf,
    /// Most bytes per second to send, e.g. 50M (k, M, G: powers of 1000);
    /// several migrations at once share it.
    #[arg(long, value_parser = migration_engine::transport::parse_rate)]
    pub bwlimit: Option<u64>,
    /// An ssh option for ssh:// destinations, as `ssh -o` takes it
    /// (repeatable), e.g. IdentityFile=/root/.ssh/migrate.
    #[arg(long = "ssh-opt")]
    pub ssh_opt: Vec<String>,
    /// The command ssh runs on the destination.
    #[arg(long, default_value = "ctmigrate receive --stdio")]
    pub remote_command: String,
    /// Move established TCP connections with the container (CRIU's TCP
    /// repair); the peers see a pause, not a reset.
    #[arg(long)]
    pub tcp_established: bool,
    /// Where CRIU's images wait to be sent (sent pages are released at
    /// once either way).
    #[arg(long, value_enum, default_value = "auto")]
    pub stage_images: StageImages,
    /// Seconds to keep asking a destination that did not acknowledge
    /// the Commit; the source stays frozen meanwhile, and after it
    /// until `ctmigrate resolve` settles the migration (exit 6).
    #[arg(long, default_value_t = 120)]
    pub in_doubt_timeout: u64,
    /// This host's migration journal.
    #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// Newline-delimited JSON events on stdout.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics over plain HTTP at ADDR:PORT (GET
    /// /metrics) while the migration runs; see docs/operations.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Compress {
    Auto,
    Always,
    Never,
}

impl From<Compress> for CompressionMode {
    fn from(c: Compress) -> Self {
        match c {
            Compress::Auto => CompressionMode::Auto,
            Compress::Always => CompressionMode::Always,
            Compress::Never => CompressionMode::Never,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Pre-copy where the kernel tracks dirty memory, else stop-copy.
    Auto,
    /// Iterative pre-dumps while the container runs, then a short freeze.
    Precopy,
    /// Freeze, dump everything, restore.
    StopCopy,
    /// Freeze, dump all but anonymous memory, restore and run at once;
    /// the memory follows on demand and in the background.
    Postcopy,
    /// Pre-copy rounds, then post-copy of what is left.
    Hybrid,
}

impl From<Mode> for ModeRequest {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => ModeRequest::Auto,
            Mode::Precopy => ModeRequest::Precopy,
            Mode::StopCopy => ModeRequest::StopCopy,
            Mode::Postcopy => ModeRequest::Postcopy,
            Mode::Hybrid => ModeRequest::Hybrid,
        }
    }
}

impl MigrationArgs {
    /// The library's options for `container`; what the command line does
    /// not set comes from the environment (runc, CRIU, this executable for
    /// the guard).
    pub fn options(self, container: String, dest_id: Option<String>) -> SendOptions {
        SendOptions {
            container,
            to: self.to,
            runtime_root: self.runtime_root,
            dest_id,
            compression: self.compress.into(),
            work_root: self.work_dir,
            runc_binary: runc_binary(),
            criu_binary: migration_engine::criu_binary(),
            io_timeout: Duration::from_secs(self.timeout),
            restore_timeout: Duration::from_secs(self.restore_timeout),
            freeze_timeout: Duration::from_secs(10),
            guard_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ctmigrate")),
            mode: self.mode.into(),
            max_iterations: self.max_iterations,
            downtime_target: Duration::from_millis(self.downtime_target),
            security: self.security.security(),
            audit_log: self.audit_log,
            bwlimit: self.bwlimit.map(migration_engine::transport::Rate::new),
            ssh_options: self.ssh_opt,
            remote_command: self.remote_command,
            tcp_established: self.tcp_established,
            stage_images: self.stage_images.into(),
            journal_dir: self.journal_dir,
            in_doubt_timeout: Duration::from_secs(self.in_doubt_timeout),
            allow_postcopy: self.allow_postcopy,
            postcopy_lease: Duration::from_millis(self.postcopy_lease),
            pod: None,
            freeze_slots: None,
        }
    }

    /// The reporter for `--json` and `--metrics`, and the metrics'
    /// responder (kept until the command ends).
    pub fn reporter(&self) -> Result<(Reporter, Option<migration_engine::metrics::MetricsServer>), ExitCode> {
        super::serve_metrics(Reporter::new(self.json), self.metrics.as_deref(), Role::Sender).map_err(|e| fail(e, exit::USAGE))
    }
}

impl SendArgs {
    /// One container's options (the first named).
    pub fn options(mut self) -> SendOptions {
        let container = self.containers.swap_remove(0);
        self.migration.options(container, self.dest_id)
    }

    pub fn run(self) -> ExitCode {
        if self.containers.len() > 1 {
            if self.dest_id.is_some() {
                return fail("--dest-id names one container's id on the destination: give it with one container only", exit::USAGE);
            }
            let containers = Some(self.containers);
            return super::evacuate::run_evacuation(self.migration, containers, &self.fleet);
        }
        let (rep, _metrics) = match self.migration.reporter() {
            Ok(served) => served,
            Err(code) => return code,
        };
        match migration_engine::send(&self.options(), &rep) {
            Ok(_) => ExitCode::from(exit::OK),
            Err(f) => {
                let code = match f.error {
                    MigrationError::Usage(_) => exit::USAGE,
                    _ => outcome_code(f.outcome),
                };
                fail(&f.error, code)
            }
        }
    }
}
