//! `ctmigrate`: the command line. Parsing and exit codes only; the work is
//! done by the `migration-engine` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use migration_engine::events::Reporter;
use migration_engine::precopy::ModeRequest;
use migration_engine::{check, receive, send, MigrationError, Outcome, ReceiveOptions, SendOptions};
use migration_testbed::validate;
use migration_protocol::CompressionMode;

/// Exit codes (documented in the README).
mod exit {
    pub const OK: u8 = 0;
    pub const INTERNAL: u8 = 1;
    pub const USAGE: u8 = 2;
}

#[derive(Parser)]
#[command(name = "ctmigrate", version, about = "Live-migrate a running runc container to another host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Compress {
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
enum StageImages {
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

/// What `validate` migrates.
#[derive(Clone, Copy, ValueEnum)]
enum ValidateWorkload {
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

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Pre-copy where the kernel tracks dirty memory, else stop-copy.
    Auto,
    /// Iterative pre-dumps while the container runs, then a short freeze.
    Precopy,
    /// Freeze, dump everything, restore.
    StopCopy,
}

/// TLS options, shared by send and receive.
#[derive(clap::Args)]
struct SecurityArgs {
    /// Directory with ca.pem, cert.pem and key.pem (see `certs init`).
    #[arg(long, default_value = migration_engine::tls::DEFAULT_TLS_DIR)]
    tls_dir: PathBuf,
    /// Plain TCP: no authentication, no encryption. Both sides must agree.
    #[arg(long)]
    insecure: bool,
}

impl SecurityArgs {
    fn security(&self) -> migration_engine::tls::Security {
        if self.insecure {
            migration_engine::tls::Security::Insecure
        } else {
            migration_engine::tls::Security::Tls(self.tls_dir.clone())
        }
    }
}

#[derive(Subcommand)]
enum CertsCommand {
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

#[derive(Subcommand)]
enum HookCommand {
    /// createRuntime hook: a veth pair from the container's network
    /// namespace to a bridge, with addresses and a default route.
    Attach {
        /// Bridge the host end joins.
        #[arg(long)]
        bridge: String,
        /// ADDR/PREFIX inside the container (repeatable).
        #[arg(long = "address", required = true)]
        addresses: Vec<String>,
        /// Default gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// MAC inside the container (default: derived from the container id).
        #[arg(long)]
        mac: Option<String>,
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Interface name inside the container.
        #[arg(long, default_value = "eth0")]
        ifname: String,
    },
    /// poststop hook: remove the host end `attach` made.
    Detach,
    /// poststop hook a receiver adds to migrated containers: remove the
    /// network namespace it built for them.
    RemoveNetns,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate a running container to a receiver.
    Send {
        /// Id of the container in the runtime.
        container: String,
        /// Destination: tcp://HOST:PORT of a `ctmigrate receive`.
        #[arg(long)]
        to: String,
        /// runc's state root on this host.
        #[arg(long, default_value = "/run/runc")]
        runtime_root: PathBuf,
        /// Id of the container on the destination (default: the same id).
        #[arg(long)]
        dest_id: Option<String>,
        /// Compress chunks with zstd: auto sends a chunk compressed only if
        /// that saves at least 10%.
        #[arg(long, value_enum, default_value = "auto")]
        compress: Compress,
        /// Directory for CRIU's images and logs (root-only, removed after).
        #[arg(long, default_value = migration_engine::DEFAULT_WORK_ROOT)]
        work_dir: PathBuf,
        /// Seconds to wait for the receiver at any step but restore.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Seconds to wait for the destination to restore the container.
        #[arg(long, default_value_t = 300)]
        restore_timeout: u64,
        /// Migration mode.
        #[arg(long, value_enum, default_value = "auto")]
        mode: Mode,
        /// Most pre-copy rounds before the final freeze (1 to 32).
        #[arg(long, default_value_t = 8)]
        max_iterations: u32,
        /// Frozen time, in milliseconds, pre-copy aims for.
        #[arg(long, default_value_t = 300)]
        downtime_target: u64,
        #[command(flatten)]
        security: SecurityArgs,
        /// Where to append one JSON line per migration.
        #[arg(long, default_value = migration_engine::audit::DEFAULT_AUDIT_LOG)]
        audit_log: PathBuf,
        /// Most bytes per second to send, e.g. 50M (k, M, G: powers of 1000).
        #[arg(long, value_parser = migration_engine::transport::parse_rate)]
        bwlimit: Option<u64>,
        /// An ssh option for ssh:// destinations, as `ssh -o` takes it
        /// (repeatable), e.g. IdentityFile=/root/.ssh/migrate.
        #[arg(long = "ssh-opt")]
        ssh_opt: Vec<String>,
        /// The command ssh runs on the destination.
        #[arg(long, default_value = "ctmigrate receive --stdio")]
        remote_command: String,
        /// Move established TCP connections with the container (CRIU's TCP
        /// repair); the peers see a pause, not a reset.
        #[arg(long)]
        tcp_established: bool,
        /// Where CRIU's images wait to be sent (sent pages are released at
        /// once either way).
        #[arg(long, value_enum, default_value = "auto")]
        stage_images: StageImages,
        /// Seconds to keep asking a destination that did not acknowledge
        /// the Commit; the source stays frozen meanwhile, and after it
        /// until `ctmigrate resolve` settles the migration (exit 6).
        #[arg(long, default_value_t = 120)]
        in_doubt_timeout: u64,
        /// This host's migration journal.
        #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
        journal_dir: PathBuf,
        /// Newline-delimited JSON events on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Accept migrations and restore them here.
    Receive {
        /// Address to listen on, ADDR:PORT.
        #[arg(long, required_unless_present = "stdio")]
        listen: Option<String>,
        /// Serve one migration over stdin/stdout (what a sender's ssh runs);
        /// events go to stderr.
        #[arg(long, conflicts_with_all = ["listen", "json"])]
        stdio: bool,
        /// Serve one migration, then exit with its result.
        #[arg(long)]
        once: bool,
        /// Where bundles of received containers are created (BUNDLE_ROOT/ID).
        #[arg(long, default_value = "/var/lib/ctmigrate/bundles")]
        bundle_root: PathBuf,
        /// runc's state root for received containers.
        #[arg(long, default_value = "/run/runc")]
        runtime_root: PathBuf,
        /// Parent of received containers' cgroups (PARENT/ID).
        #[arg(long, default_value = "/ctmigrate")]
        cgroup_parent: String,
        /// Directory for received images and CRIU's logs (root-only).
        #[arg(long, default_value = migration_engine::DEFAULT_WORK_ROOT)]
        work_dir: PathBuf,
        /// Seconds of silence from the sender before giving up.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Most bytes (before compression) one migration may send, e.g.
        /// 256G (K, M, G, T: powers of 1024) or a number of bytes.
        #[arg(long, default_value = "256G", value_parser = migration_engine::admission::parse_size)]
        max_bytes: u64,
        /// Host directory whose contents containers may bind-mount
        /// (repeatable); other host bind mounts are refused.
        #[arg(long = "allow-bind-source")]
        allow_bind_source: Vec<PathBuf>,
        /// Clear setuid and setgid bits of received rootfs files.
        #[arg(long)]
        strip_setuid: bool,
        /// Bridge that migrated containers' interfaces are attached to (the
        /// container keeps its addresses and MAC).
        #[arg(long)]
        bridge: Option<String>,
        /// Where received images wait for the restore.
        #[arg(long, value_enum, default_value = "auto")]
        stage_images: StageImages,
        /// Seconds a connection has, from accept, to finish the TLS
        /// handshake and send its Hello; then it is closed.
        #[arg(long, default_value_t = 10)]
        handshake_timeout: u64,
        /// Connections in their handshake at once; more are closed at once.
        #[arg(long, default_value_t = migration_engine::listener::DEFAULT_MAX_HANDSHAKES)]
        max_handshakes: usize,
        /// Connections in their handshake at once from one IP address.
        #[arg(long, default_value_t = migration_engine::listener::DEFAULT_MAX_HANDSHAKES_PER_IP)]
        max_handshakes_per_ip: usize,
        /// Migrations served at once; another sender is refused (exit 3,
        /// its source untouched).
        #[arg(long, default_value_t = migration_engine::admission::DEFAULT_MAX_MIGRATIONS)]
        max_migrations: usize,
        /// Memory all migrations in flight may reserve for staging images
        /// (e.g. 2G); default three quarters of MemAvailable.
        #[arg(long, value_parser = migration_engine::admission::parse_size)]
        staging_memory: Option<u64>,
        #[command(flatten)]
        security: SecurityArgs,
        /// Where to append one JSON line per migration.
        #[arg(long, default_value = migration_engine::audit::DEFAULT_AUDIT_LOG)]
        audit_log: PathBuf,
        /// This host's migration journal.
        #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
        journal_dir: PathBuf,
        /// Newline-delimited JSON events on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the migrations on this host that are in flight or in doubt.
    Status {
        /// Also those that are settled (the journal keeps the newest 200).
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
        journal_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Settle a migration left in doubt: ask the other host what it did
    /// and act on it, or keep one copy by hand.
    Resolve {
        /// The migration id (`ctmigrate status` lists them).
        id: String,
        /// Keep this copy and remove the other one's claim here; refused
        /// if the other host is reachable and says otherwise.
        #[arg(long, value_enum)]
        keep: Option<KeepCopy>,
        /// Seconds to wait for the other host's answer.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        #[arg(long, default_value = migration_engine::journal::DEFAULT_DIR)]
        journal_dir: PathBuf,
    },
    /// Certificates for authenticated, encrypted migrations.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Check that this host can send and receive migrations.
    Check {
        /// runc's state root.
        #[arg(long, default_value = "/run/runc")]
        runtime_root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Migrate a container between two local network-namespace hosts (a
    /// fixture, or a real service under its client), check it survived,
    /// and remove everything.
    Validate {
        /// What to migrate: the busybox counter, or a real service in a
        /// Debian rootfs under a client that checks every answer (the
        /// rootfs is built by mmdebstrap on first use, about a minute, and
        /// cached in /var/cache/ctmigrate/rootfs).
        #[arg(long, value_enum, default_value = "counter")]
        workload: ValidateWorkload,
        #[arg(long)]
        json: bool,
    },
    /// OCI runtime hooks (state JSON on stdin); see docs/hooks.md.
    Hook {
        #[command(subcommand)]
        command: HookCommand,
    },
    /// Internal: the freeze guard a sender starts (see migration-engine's
    /// guard module).
    #[command(name = "__guard", hide = true)]
    Guard { version: String, freezer: PathBuf, work_dir: PathBuf, journal_entry: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeepCopy {
    Source,
    Destination,
}

fn runc_binary() -> PathBuf {
    std::env::var_os("CTMIGRATE_RUNC").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runc"))
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ctmigrate: error: {msg}");
    ExitCode::from(code)
}

fn outcome_code(o: Outcome) -> u8 {
    o.exit_code() as u8
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Send { .. } | Command::Receive { .. }) {
        migration_engine::interrupt::install();
    }
    match cli.command {
        Command::Send {
            container,
            to,
            runtime_root,
            dest_id,
            compress,
            work_dir,
            timeout,
            restore_timeout,
            mode,
            max_iterations,
            downtime_target,
            security,
            audit_log,
            bwlimit,
            ssh_opt,
            remote_command,
            tcp_established,
            stage_images,
            in_doubt_timeout,
            journal_dir,
            json,
        } => {
            let to = match to.parse() {
                Ok(d) => d,
                Err(e) => return fail(e, exit::USAGE),
            };
            let opts = SendOptions {
                container,
                to,
                runtime_root,
                dest_id,
                compression: compress.into(),
                work_root: work_dir,
                runc_binary: runc_binary(),
                criu_binary: criu_bindings_binary(),
                io_timeout: Duration::from_secs(timeout),
                restore_timeout: Duration::from_secs(restore_timeout),
                freeze_timeout: Duration::from_secs(10),
                guard_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ctmigrate")),
                mode: match mode {
                    Mode::Auto => ModeRequest::Auto,
                    Mode::Precopy => ModeRequest::Precopy,
                    Mode::StopCopy => ModeRequest::StopCopy,
                },
                max_iterations,
                downtime_target: Duration::from_millis(downtime_target),
                security: security.security(),
                audit_log,
                bwlimit,
                ssh_options: ssh_opt,
                remote_command,
                tcp_established,
                stage_images: stage_images.into(),
                journal_dir,
                in_doubt_timeout: Duration::from_secs(in_doubt_timeout),
            };
            let rep = Reporter::new(json);
            match send(&opts, &rep) {
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
        Command::Receive {
            listen,
            stdio,
            once,
            bundle_root,
            runtime_root,
            cgroup_parent,
            work_dir,
            timeout,
            max_bytes,
            allow_bind_source,
            strip_setuid,
            bridge,
            stage_images,
            handshake_timeout,
            max_handshakes,
            max_handshakes_per_ip,
            max_migrations,
            staging_memory,
            security,
            audit_log,
            journal_dir,
            json,
        } => {
            if let Some(b) = &bridge {
                if let Err(e) = container_network::check_bridge(b) {
                    return fail(e, exit::USAGE);
                }
            }
            let opts = ReceiveOptions {
                listen: listen.unwrap_or_default(),
                once,
                bundle_root,
                runtime_root,
                cgroup_parent,
                work_root: work_dir,
                runc_binary: runc_binary(),
                io_timeout: Duration::from_secs(timeout),
                max_image_file: 64 << 30,
                max_image_files: 100_000,
                max_bytes,
                security: security.security(),
                audit_log,
                allowed_bind_sources: allow_bind_source,
                unpack: migration_engine::rootfs::UnpackPolicy { strip_setuid },
                bridge,
                stage_images: stage_images.into(),
                journal_dir,
                handshake_timeout: Duration::from_secs(handshake_timeout.max(1)),
                max_handshakes,
                max_handshakes_per_ip,
                max_migrations,
                staging_memory,
            };
            if stdio {
                // stdout carries the migration stream.
                let rep = Reporter::with_mode(migration_engine::events::ReportMode::Plain);
                return match migration_engine::receive_stdio(&opts, &rep) {
                    Ok(()) => ExitCode::from(exit::OK),
                    Err((e, o)) => fail(e, outcome_code(o)),
                };
            }
            let rep = Reporter::new(json);
            match receive(&opts, &rep) {
                Ok(()) => ExitCode::from(exit::OK),
                Err((e, o)) => fail(e, outcome_code(o)),
            }
        }
        Command::Certs { command: CertsCommand::Init { out, hosts } } => {
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
        Command::Check { runtime_root, json } => {
            let report = check::run(&check::CheckOptions {
                runtime_root,
                runc_binary: runc_binary(),
                criu_binary: criu_bindings_binary(),
            });
            report.print(json);
            if report.ok() {
                ExitCode::from(exit::OK)
            } else {
                ExitCode::from(outcome_code(Outcome::NothingTouched))
            }
        }
        Command::Status { all, journal_dir, json } => {
            let journal = migration_engine::journal::Journal::new(journal_dir);
            let (lines, damaged) = migration_engine::resolve::status(&journal, all);
            if json {
                for l in &lines {
                    println!("{}", serde_json::to_string(l).unwrap_or_default());
                }
            } else if lines.is_empty() {
                println!("no migrations {}in {}", if all { "" } else { "in flight or in doubt " }, journal.dir().display());
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
        Command::Resolve { id, keep, timeout, journal_dir } => {
            let journal = migration_engine::journal::Journal::new(journal_dir);
            let keep = keep.map(|k| match k {
                KeepCopy::Source => migration_engine::resolve::Keep::Source,
                KeepCopy::Destination => migration_engine::resolve::Keep::Destination,
            });
            let note = |m: &str| eprintln!("ctmigrate: {m}");
            match migration_engine::resolve::resolve(&journal, &id, keep, Duration::from_secs(timeout), &note) {
                Ok(done) => {
                    println!("{done}");
                    ExitCode::from(exit::OK)
                }
                Err((e, o)) => fail(e, outcome_code(o)),
            }
        }
        Command::Guard { version, freezer, work_dir, journal_entry } => match migration_engine::guard::run_guard(&version, freezer, work_dir, journal_entry) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => fail(e, exit::INTERNAL),
        },
        Command::Hook { command } => {
            let state = match runtime_hooks::HookState::read(std::io::stdin().lock()) {
                Ok(s) => s,
                Err(e) => return fail(e, exit::USAGE),
            };
            let done = match command {
                HookCommand::Attach { bridge, addresses, gateway, mac, mtu, ifname } => {
                    runtime_hooks::attach(&state, &runtime_hooks::AttachOptions { bridge, ifname, addresses, gateway, mac, mtu })
                }
                HookCommand::Detach => runtime_hooks::detach(&state),
                HookCommand::RemoveNetns => runtime_hooks::remove_netns(&state),
            };
            match done {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => fail(format!("hook for container `{}`: {e}", state.id), exit::INTERNAL),
            }
        }
        Command::Validate { workload, json } => {
            let rep = Reporter::new(json);
            let opts = validate::ValidateOptions { workload: workload.into() };
            match validate::run(&opts, &rep) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => fail(e, exit::INTERNAL),
            }
        }
    }
}

fn criu_bindings_binary() -> PathBuf {
    migration_engine::criu_binary()
}
