//! `ctmigrate receive`: accept migrations and restore them here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use migration_engine::events::Reporter;
use migration_engine::metrics::Role;
use migration_engine::ReceiveOptions;

use super::receiver_config::ReceiverConfig;
use super::{exit, fail, outcome_code, runc_binary, StageImages};

/// The flags a configuration file may also set are `Option`s here (their
/// defaults are applied after the file, in [`ReceiveArgs::settings`]), so
/// that a flag given on the command line overrides the file.
#[derive(clap::Args)]
pub struct ReceiveArgs {
    /// Address to listen on, ADDR:PORT (required unless --stdio, or
    /// `listen` in the configuration file).
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve one migration over stdin/stdout (what a sender's ssh runs);
    /// events go to stderr.
    #[arg(long, conflicts_with_all = ["listen", "json"])]
    pub stdio: bool,
    /// Serve one migration, then exit with its result.
    #[arg(long)]
    pub once: bool,
    /// Configuration file (TOML, the flags' names as keys; see
    /// docs/operations.md). Without it, /etc/ctmigrate/receiver.toml is
    /// read if it exists. Flags given here override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read no configuration file, not even /etc/ctmigrate/receiver.toml.
    #[arg(long, conflicts_with = "config")]
    pub no_config: bool,
    /// Where bundles of received containers are created (BUNDLE_ROOT/ID)
    /// [default: /var/lib/ctmigrate/bundles].
    #[arg(long)]
    pub bundle_root: Option<PathBuf>,
    /// runc's state root for received containers [default: /run/runc].
    #[arg(long)]
    pub runtime_root: Option<PathBuf>,
    /// Parent of received containers' cgroups (PARENT/ID) [default:
    /// /ctmigrate].
    #[arg(long)]
    pub cgroup_parent: Option<String>,
    /// Directory for received images and CRIU's logs (root-only)
    /// [default: /run/ctmigrate].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Seconds of silence from the sender before giving up [default: 60].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Most bytes (before compression) one migration may send, e.g.
    /// 256G (K, M, G, T: powers of 1024) or a number of bytes [default:
    /// 256G].
    #[arg(long, value_parser = migration_engine::admission::parse_size)]
    pub max_bytes: Option<u64>,
    /// Host directory whose contents containers may bind-mount
    /// (repeatable; replaces the configuration file's list); other host
    /// bind mounts are refused.
    #[arg(long = "allow-bind-source")]
    pub allow_bind_source: Vec<PathBuf>,
    /// Clear setuid and setgid bits of received rootfs files.
    #[arg(long)]
    pub strip_setuid: bool,
    /// Bridge that migrated containers' interfaces are attached to (the
    /// container keeps its addresses and MAC).
    #[arg(long)]
    pub bridge: Option<String>,
    /// Where received images wait for the restore [default: auto].
    #[arg(long, value_enum)]
    pub stage_images: Option<StageImages>,
    /// Seconds a connection has, from accept, to finish the TLS
    /// handshake and send its Hello; then it is closed [default: 10].
    #[arg(long)]
    pub handshake_timeout: Option<u64>,
    /// Connections in their handshake at once; more are closed at once
    /// [default: 64].
    #[arg(long)]
    pub max_handshakes: Option<usize>,
    /// Connections in their handshake at once from one IP address
    /// [default: 8].
    #[arg(long)]
    pub max_handshakes_per_ip: Option<usize>,
    /// Migrations served at once; another sender is refused (exit 3,
    /// its source untouched) [default: 4].
    #[arg(long)]
    pub max_migrations: Option<usize>,
    /// Memory all migrations in flight may reserve for staging images
    /// (e.g. 2G); default three quarters of MemAvailable.
    #[arg(long, value_parser = migration_engine::admission::parse_size)]
    pub staging_memory: Option<u64>,
    /// Directory with ca.pem, cert.pem and key.pem (see `certs init`)
    /// [default: /etc/ctmigrate/tls].
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Plain TCP: no authentication, no encryption. Both sides must agree.
    #[arg(long)]
    pub insecure: bool,
    /// Where to append one JSON line per migration [default:
    /// /var/log/ctmigrate/audit.log].
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// This host's migration journal [default: /var/lib/ctmigrate/journal].
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
    /// Newline-delimited JSON events on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also append the JSON events to FILE, one per line, while log lines
    /// go to stderr (what a service under systemd does: the journal gets
    /// the log lines, FILE the events).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Serve Prometheus metrics over plain HTTP at ADDR:PORT (GET
    /// /metrics), e.g. 127.0.0.1:9464; see docs/operations.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// What `receive` runs with: the library's options and how to report.
pub struct Settings {
    pub opts: ReceiveOptions,
    pub stdio: bool,
    pub json: bool,
    pub events: Option<PathBuf>,
    /// Where to serve metrics (`--metrics`).
    pub metrics: Option<String>,
    /// The configuration file read, if any.
    pub config: Option<PathBuf>,
}

impl ReceiveArgs {
    /// The library's options with no configuration file: the flags, else
    /// their defaults. Limits the command line does not expose keep their
    /// defaults here.
    #[cfg(test)]
    pub fn options(self) -> ReceiveOptions {
        self.settings(None).expect("no file, nothing to refuse").opts
    }

    /// The flags over the file's keys over the defaults. Refused (usage
    /// error) when nothing says where to listen.
    pub fn settings(self, file: Option<(PathBuf, ReceiverConfig)>) -> anyhow::Result<Settings> {
        let (config, f) = match file {
            Some((path, cfg)) => (Some(path), cfg),
            None => (None, ReceiverConfig::default()),
        };
        let listen = if self.stdio { None } else { self.listen.or(f.listen) };
        if !self.stdio && listen.is_none() {
            match &config {
                Some(p) => anyhow::bail!("no address to listen on: give --listen ADDR:PORT (or `listen` in {}), or --stdio", p.display()),
                None => anyhow::bail!("no address to listen on: give --listen ADDR:PORT (or `listen` in a --config file), or --stdio"),
            }
        }
        let insecure = self.insecure || f.insecure.unwrap_or(false);
        let tls_dir = self.tls_dir.or(f.tls_dir).unwrap_or_else(|| PathBuf::from(migration_engine::tls::DEFAULT_TLS_DIR));
        let security =
            if insecure { migration_engine::tls::Security::Insecure } else { migration_engine::tls::Security::Tls(tls_dir) };
        let allowed_bind_sources =
            if self.allow_bind_source.is_empty() { f.allow_bind_source.unwrap_or_default() } else { self.allow_bind_source };
        let stage_images = self.stage_images.or(f.stage_images).unwrap_or(StageImages::Auto);
        let opts = ReceiveOptions {
            listen: listen.unwrap_or_default(),
            once: self.once,
            bundle_root: self.bundle_root.or(f.bundle_root).unwrap_or_else(|| PathBuf::from("/var/lib/ctmigrate/bundles")),
            runtime_root: self.runtime_root.or(f.runtime_root).unwrap_or_else(|| PathBuf::from("/run/runc")),
            cgroup_parent: self.cgroup_parent.or(f.cgroup_parent).unwrap_or_else(|| "/ctmigrate".to_string()),
            work_root: self.work_dir.or(f.work_dir).unwrap_or_else(|| PathBuf::from(migration_engine::DEFAULT_WORK_ROOT)),
            runc_binary: runc_binary(),
            io_timeout: Duration::from_secs(self.timeout.or(f.timeout).unwrap_or(60)),
            max_image_file: 64 << 30,
            max_image_files: 100_000,
            max_bytes: self.max_bytes.or(f.max_bytes).unwrap_or(256 << 30),
            security,
            audit_log: self.audit_log.or(f.audit_log).unwrap_or_else(|| PathBuf::from(migration_engine::audit::DEFAULT_AUDIT_LOG)),
            allowed_bind_sources,
            unpack: migration_engine::rootfs::UnpackPolicy { strip_setuid: self.strip_setuid || f.strip_setuid.unwrap_or(false) },
            bridge: self.bridge.or(f.bridge),
            stage_images: stage_images.into(),
            journal_dir: self.journal_dir.or(f.journal_dir).unwrap_or_else(|| PathBuf::from(migration_engine::journal::DEFAULT_DIR)),
            handshake_timeout: Duration::from_secs(self.handshake_timeout.or(f.handshake_timeout).unwrap_or(10).max(1)),
            max_handshakes: self.max_handshakes.or(f.max_handshakes).unwrap_or(migration_engine::listener::DEFAULT_MAX_HANDSHAKES),
            max_handshakes_per_ip: self
                .max_handshakes_per_ip
                .or(f.max_handshakes_per_ip)
                .unwrap_or(migration_engine::listener::DEFAULT_MAX_HANDSHAKES_PER_IP),
            max_migrations: self.max_migrations.or(f.max_migrations).unwrap_or(migration_engine::admission::DEFAULT_MAX_MIGRATIONS),
            staging_memory: self.staging_memory.or(f.staging_memory),
        };
        // --stdio's stdout is the migration stream: no JSON there.
        let json = !self.stdio && (self.json || f.json.unwrap_or(false));
        Ok(Settings { opts, stdio: self.stdio, json, events: self.events.or(f.events), metrics: self.metrics.or(f.metrics), config })
    }

    pub fn run(self) -> ExitCode {
        let file = match ReceiverConfig::find(self.config.as_deref(), self.no_config) {
            Ok(file) => file,
            Err(e) => return fail(format!("{e:#}"), exit::USAGE),
        };
        let settings = match self.settings(file) {
            Ok(s) => s,
            Err(e) => return fail(e, exit::USAGE),
        };
        if let Some(b) = &settings.opts.bridge {
            if let Err(e) = container_network::check_bridge(b) {
                return fail(e, exit::USAGE);
            }
        }
        let rep = if settings.stdio {
            // stdout carries the migration stream.
            Reporter::with_mode(migration_engine::events::ReportMode::Plain)
        } else {
            // A signal stops a listening receiver cleanly (exit 0 once
            // what was in flight rolled back), idle or not.
            migration_engine::interrupt::stop_cleanly();
            Reporter::new(settings.json)
        };
        let rep = match &settings.events {
            Some(path) => match open_events_file(path) {
                Ok(f) => rep.with_events_file(f),
                Err(e) => return fail(format!("cannot open the events file {}: {e}", path.display()), exit::USAGE),
            },
            None => rep,
        };
        let (rep, _metrics) = match super::serve_metrics(rep, settings.metrics.as_deref(), Role::Receiver) {
            Ok(served) => served,
            Err(e) => return fail(e, exit::USAGE),
        };
        if let Some(config) = &settings.config {
            rep.note(format!("configuration read from {}", config.display()));
        }
        let result = if settings.stdio {
            migration_engine::receive_stdio(&settings.opts, &rep)
        } else {
            migration_engine::receive(&settings.opts, &rep)
        };
        match result {
            Ok(()) => ExitCode::from(exit::OK),
            Err((e, o)) => fail(e, outcome_code(o)),
        }
    }
}

/// The events file, opened to append (its directory made if missing);
/// only root reads it, as the audit log.
fn open_events_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}
