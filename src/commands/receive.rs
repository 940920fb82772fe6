//! `ctmigrate receive`: accept migrations and restore them here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use migration_engine::events::Reporter;
use migration_engine::ReceiveOptions;

use super::{exit, fail, outcome_code, runc_binary, SecurityArgs, StageImages};

#[derive(clap::Args)]
pub struct ReceiveArgs {
    /// Address to listen on, ADDR:PORT.
    #[arg(long, required_unless_present = "stdio")]
    pub listen: Option<String>,
    /// Serve one migration over stdin/stdout (what a sender's ssh runs);
    /// events go to stderr.
    #[arg(long, conflicts_with_all = ["listen", "json"])]
    pub stdio: bool,
    /// Serve one migration, then exit with its result.
    #[arg(long)]
    pub once: bool,
    /// Where bundles of received containers are created (BUNDLE_ROOT/ID).
    #[arg(long, default_value = "/var/lib/ctmigrate/bundles")]
    pub bundle_root: PathBuf,
    /// runc's state root for received containers.
    #[arg(long, default_value = "/run/runc")]
    pub runtime_root: PathBuf,
    /// Parent of received containers' cgroups (PARENT/ID).
    #[arg(long, default_value = "/ctmigrate")]
    pub cgroup_parent: String,
    /// Directory for received images and CRIU's logs (root-only).
    #[arg(long, default_value = migration_engine::DEFAULT_WORK_ROOT)]
    pub work_dir: PathBuf,
    /// Seconds of silence from the sender before giving up.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Most bytes (before compression) one migration may send, e.g.
    /// 256G (K, M, G, T: powers of 1024) or a number of bytes.
    #[arg(long, default_value = "256G", value_parser = migration_engine::admission::parse_size)]
    pub max_bytes: u64,
    /// Host directory whose contents containers may bind-mount
    /// (repeatable); other host bind mounts are refused.
    #[arg(long = "allow-bind-source")]
    pub allow_bind_source: Vec<PathBuf>,
    /// Clear setuid and setgid bits of received rootfs files.
    #[arg(long)]
    pub strip_setuid: bool,
    /// Bridge that migrated containers' interfaces are attached to (the
    /// container keeps its addresses and MAC).
    #[arg(long)]
    pub bridge: Option<String>,
    /// Where received images wait for the restore.
    #[arg(long, value_enum, default_value = "auto")]
    pub stage_images: StageImages,
    /// Seconds a connection has, from accept, to finish the TLS
    /// handshake and send its Hello; then it is closed.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Connections in their handshake at once; more are closed at once.
    #[arg(long, default_value_t = migration_engine::listener::DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// Connections in their handshake at once from one IP address.
    #[arg(long, default_value_t = migration_engine::listener::DEFAULT_MAX_HANDSHAKES_PER_IP)]
    pub max_handshakes_per_ip: usize,
    /// Migrations served at once; another sender is refused (exit 3,
    /// its source untouched).
    #[arg(long, default_value_t = migration_engine::admission::DEFAULT_MAX_MIGRATIONS)]
    pub max_migrations: usize,
    /// Memory all migrations in flight may reserve for staging images
    /// (e.g. 2G); default three quarters of MemAvailable.
    #[arg(long, value_parser = migration_engine::admission::parse_size)]
    pub staging_memory: Option<u64>,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Where to append one JSON line per migration.
    #[arg(long, default_value = migration_engine::audit::DEFAULT_AUDIT_LOG)]
    pub audit_log: PathBuf,
    /// This host's migration journal.
    #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// Newline-delimited JSON events on stdout.
    #[arg(long)]
    pub json: bool,
}

impl ReceiveArgs {
    /// The library's options; limits the command line does not expose
    /// keep their defaults here.
    pub fn options(self) -> ReceiveOptions {
        ReceiveOptions {
            listen: self.listen.unwrap_or_default(),
            once: self.once,
            bundle_root: self.bundle_root,
            runtime_root: self.runtime_root,
            cgroup_parent: self.cgroup_parent,
            work_root: self.work_dir,
            runc_binary: runc_binary(),
            io_timeout: Duration::from_secs(self.timeout),
            max_image_file: 64 << 30,
            max_image_files: 100_000,
            max_bytes: self.max_bytes,
            security: self.security.security(),
            audit_log: self.audit_log,
            allowed_bind_sources: self.allow_bind_source,
            unpack: migration_engine::rootfs::UnpackPolicy { strip_setuid: self.strip_setuid },
            bridge: self.bridge,
            stage_images: self.stage_images.into(),
            journal_dir: self.journal_dir,
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            max_handshakes: self.max_handshakes,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            max_migrations: self.max_migrations,
            staging_memory: self.staging_memory,
        }
    }

    pub fn run(self) -> ExitCode {
        if let Some(b) = &self.bridge {
            if let Err(e) = container_network::check_bridge(b) {
                return fail(e, exit::USAGE);
            }
        }
        let (stdio, json) = (self.stdio, self.json);
        let opts = self.options();
        let result = if stdio {
            // stdout carries the migration stream.
            let rep = Reporter::with_mode(migration_engine::events::ReportMode::Plain);
            migration_engine::receive_stdio(&opts, &rep)
        } else {
            migration_engine::receive(&opts, &Reporter::new(json))
        };
        match result {
            Ok(()) => ExitCode::from(exit::OK),
            Err((e, o)) => fail(e, outcome_code(o)),
        }
    }
}
