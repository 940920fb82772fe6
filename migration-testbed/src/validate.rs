//! `ctmigrate validate`: a whole migration between two local hosts.
//!
//! Creates two network-namespace hosts with separate runtime and bundle
//! roots, starts a container on one, migrates it to the other over TCP
//! with this very binary on both sides, checks it, and removes everything,
//! also on failure.
//!
//! - The counter fixture (the default): it kept counting from where it was
//!   (same token, higher count).
//! - `--workload redis|nginx|postgres`: a real service in a Debian
//!   bookworm rootfs (built by mmdebstrap on first use, then cached), run
//!   and checked as tests/workloads.rs does, through the same code
//!   ([`crate::services`]): a client in a third namespace holds
//!   its connection across a `--tcp-established` migration and checks
//!   every answer; afterwards exactly one copy runs (the source's gone, the
//!   destination's running) and nothing is left on either host.

use std::path::Path;
use std::time::Duration;

use migration_engine::events::{Event, ResultEvent};
use crate::services::{pid_namespace, run_token, ServiceBed};
use crate::{debian, nginx, postgres, read_counter, redis, wait_for, Testbed, Workload};
use migration_engine::{MigrationError, Reporter};

/// What `validate` migrates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ValidateWorkload {
    /// The busybox counter fixture.
    #[default]
    Counter,
    /// Redis with a million keys; a client doing SET/GET on one
    /// connection.
    Redis,
    /// nginx with www-data workers; a keep-alive client checking each
    /// download's SHA-256.
    Nginx,
    /// PostgreSQL 15 under pgbench (4 clients).
    Postgres,
}

impl ValidateWorkload {
    pub fn name(self) -> &'static str {
        match self {
            ValidateWorkload::Counter => "counter",
            ValidateWorkload::Redis => "redis",
            ValidateWorkload::Nginx => "nginx",
            ValidateWorkload::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ValidateOptions {
    pub workload: ValidateWorkload,
}

/// What a validation saw: the sender's result event and, for a service,
/// its client's checked answers and longest wait.
struct Checked {
    sender: serde_json::Value,
    answers: Option<u64>,
    longest_gap: Option<Duration>,
}

pub fn run(opts: &ValidateOptions, rep: &Reporter) -> Result<(), MigrationError> {
    let outcome = (|| {
        if !nix::unistd::geteuid().is_root() {
            return Err(MigrationError::Preflight("validate creates network namespaces and containers: run it as root".into()));
        }
        let exe = std::env::current_exe().map_err(MigrationError::io("locating the ctmigrate binary"))?;
        match opts.workload {
            ValidateWorkload::Counter => counter(&exe, rep),
            w => service(w, &exe, rep),
        }
    })();
    // The testbed and containers are gone here (dropped inside).
    let mut result = ResultEvent {
        role: "validate",
        mode: "stop-copy".into(),
        workload: Some(opts.workload.name().into()),
        ..Default::default()
    };
    match &outcome {
        Ok(c) => {
            let s = &c.sender;
            result.ok = true;
            result.container = s["container"].as_str().unwrap_or_default().to_string();
            result.dest_id = s["dest_id"].as_str().unwrap_or_default().to_string();
            result.frozen_ms = s["frozen_ms"].as_u64();
            result.total_ms = s["total_ms"].as_u64().unwrap_or(0);
            result.bytes_sent = s["bytes_sent"].as_u64().unwrap_or(0);
            result.bytes_raw = s["bytes_raw"].as_u64().unwrap_or(0);
            result.image_bytes = s["image_bytes"].as_u64().unwrap_or(0);
            result.rootfs_verified = s["rootfs_verified"].as_bool().unwrap_or(false);
            result.answers_checked = c.answers;
            result.client_longest_gap_ms = c.longest_gap.map(|g| g.as_millis() as u64);
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    rep.emit(Event::Result(result));
    outcome.map(|_| ())
}

/// A testbed whose migrations keep their failure logs where the host's
/// audit logs do (/var/log/ctmigrate/validate/, failures in its failed/),
/// since the testbed is removed at the end.
fn validate_testbed(exe: &Path) -> Result<Testbed, MigrationError> {
    let mut bed = Testbed::create("val", exe)?;
    bed.audit_dir = Path::new(migration_engine::audit::DEFAULT_AUDIT_LOG).parent().expect("an absolute path").join("validate");
    Ok(bed)
}

fn counter(exe: &Path, rep: &Reporter) -> Result<Checked, MigrationError> {
    let bed = validate_testbed(exe)?;
    let id = format!("ctmigrate-validate-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter)?;
    let (token, before) = wait_for(Duration::from_secs(10), || read_counter(&src.rootfs()).filter(|(_, n)| *n >= 10))
        .ok_or_else(|| MigrationError::Other("the fixture container did not start counting".into()))?;
    rep.note(format!("fixture {id} counting on the source host ({before})"));

    let port = receiver_port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[])?;
    let sent = bed.run_sender(&id, port, &[], &[])?;
    let recv_code = receiver.wait(Duration::from_secs(60));
    let sender_result = sent.result().cloned().unwrap_or_default();
    if sent.code != Some(0) {
        return Err(MigrationError::Other(format!(
            "send failed (exit {:?}): {}; receiver: {}",
            sent.code,
            sent.stderr.trim(),
            receiver.stderr().trim()
        )));
    }
    if recv_code != Some(0) {
        return Err(MigrationError::Other(format!("receive failed (exit {recv_code:?}): {}", receiver.stderr().trim())));
    }
    if bed.src_runc.exists(&id)? {
        return Err(MigrationError::Other("the source container still exists after migration".into()));
    }
    let dst = bed.dst_container(&id);
    let state = dst.runc.running(&id)?;
    let (tok2, after) = wait_for(Duration::from_secs(10), || read_counter(&dst.rootfs()).filter(|(_, n)| *n > before + 5))
        .ok_or_else(|| MigrationError::Other("the migrated container does not count on the destination".into()))?;
    if tok2 != token {
        return Err(MigrationError::Other(format!(
            "the container restarted instead of migrating (token {token} became {tok2})"
        )));
    }
    rep.note(format!("{id} runs on the destination (pid {}), counter {before} → {after}, same token", state.pid));
    Ok(Checked { sender: sender_result, answers: None, longest_gap: None })
}

/// A port for the receiver, distinct between concurrent validations.
fn receiver_port() -> u16 {
    7400 + (std::process::id() % 500) as u16
}

fn service(workload: ValidateWorkload, exe: &Path, rep: &Reporter) -> Result<Checked, MigrationError> {
    let name = workload.name();
    if let Some(why) = debian::missing_tool() {
        return Err(MigrationError::Preflight(format!(
            "validate --workload {name} needs a Debian rootfs built with mmdebstrap: {why}"
        )));
    }
    let note = |m: &str| rep.note(m);
    // The rootfs first (cached after the first run), before any namespace
    // or container exists.
    let (rootfs, _) = debian::SERVICES.get(&note)?;
    rep.note(format!(
        "starting {name} in a copy of {} on one of two local hosts, its client in a third",
        rootfs.display()
    ));
    let bed = validate_testbed(exe)?;
    let checked = match workload {
        ValidateWorkload::Redis => validate_redis(bed, rep)?,
        ValidateWorkload::Nginx => validate_nginx(bed, rep)?,
        ValidateWorkload::Postgres => validate_postgres(bed, rep)?,
        ValidateWorkload::Counter => return Err(MigrationError::Other("the counter fixture is not a service".into())),
    };
    Ok(checked)
}

fn migrate(sb: &mut ServiceBed, rep: &Reporter) -> Result<serde_json::Value, MigrationError> {
    rep.note(format!("migrating {} with --tcp-established to the other host", sb.id));
    let migrated = sb.migrate(receiver_port())?;
    let s = &migrated.sender;
    rep.note(format!(
        "{} migrated in {:.1} s: frozen {} ms, {:.1} MB sent, rootfs verified",
        sb.id,
        migrated.took.as_secs_f64(),
        s["frozen_ms"],
        s["bytes_sent"].as_u64().unwrap_or(0) as f64 / 1e6
    ));
    Ok(migrated.sender)
}

/// Exactly one copy, then the destination's container deleted and
/// nothing left on either host.
fn one_copy_then_clean(sb: ServiceBed, src_pidns: u64, extra: impl FnOnce(&Path) -> Result<(), MigrationError>, rep: &Reporter) -> Result<(), MigrationError> {
    let dst = sb.exactly_one_copy(src_pidns)?;
    extra(&dst.rootfs())?;
    rep.note(format!("{} runs on the destination only; removing it", sb.id));
    sb.finish(dst)?;
    Ok(())
}

fn validate_redis(bed: Testbed, rep: &Reporter) -> Result<Checked, MigrationError> {
    let mut sb = ServiceBed::create(bed, "redis", &redis::spec(), |_| Ok(()), &|m| rep.note(m))?;
    let (stream, mut conn) = redis::connect(&mut sb)?;
    let src_pidns = pid_namespace(sb.source_pid()?)?;
    rep.note(format!("{} answers; DEBUG POPULATE {} keys", sb.id, redis::POPULATED));
    redis::populate(&mut sb, &mut conn)?;
    let run_id = conn.run_id()?;
    let token = run_token();
    let mut client = redis::client(&stream, conn, &token)?;
    client.wait_progress(2_000, Duration::from_secs(60), "before migrating")?;
    let sender = migrate(&mut sb, rep)?;
    client.wait_progress(2_000, Duration::from_secs(120), "after migrating")?;
    let (mut conn, steps, gap) = client.stop()?;
    // Same server process (not restarted), the key count exact, every
    // value right: the client's and the million populated ones.
    if conn.run_id()? != run_id {
        return Err(MigrationError::Other("redis was restarted instead of migrated (its run_id changed)".into()));
    }
    redis::check_every_value(&mut conn, &token, steps)?;
    drop((conn, stream));
    one_copy_then_clean(sb, src_pidns, |_| Ok(()), rep)?;
    Ok(Checked { sender, answers: Some(steps), longest_gap: Some(gap) })
}

fn validate_nginx(bed: Testbed, rep: &Reporter) -> Result<Checked, MigrationError> {
    let (blob, digest) = nginx::blob();
    let mut sb = ServiceBed::create(bed, "nginx", &nginx::spec(), |rootfs| nginx::prepare(rootfs, &blob), &|m| rep.note(m))?;
    let src_pidns = pid_namespace(sb.source_pid()?)?;
    let (stream, _) = nginx::connect(&mut sb, src_pidns)?;
    rep.note(format!("{} answers; downloading a {} byte file again and again on one connection", sb.id, nginx::BLOB_LEN));
    let mut client = nginx::client(&stream, &digest)?;
    client.wait_progress(20, Duration::from_secs(60), "before migrating")?;
    let sender = migrate(&mut sb, rep)?;
    client.wait_progress(20, Duration::from_secs(120), "after migrating")?;
    let (_, downloads, gap) = client.stop()?;
    drop(stream);
    let served_intact = |rootfs: &Path| {
        let served = std::fs::read(rootfs.join(nginx::BLOB_PATH)).map_err(MigrationError::io("reading the served file on the destination"))?;
        if crate::services::sha256_hex(&served) != digest {
            return Err(MigrationError::Other("the served file changed on the destination".into()));
        }
        Ok(())
    };
    one_copy_then_clean(sb, src_pidns, served_intact, rep)?;
    Ok(Checked { sender, answers: Some(downloads), longest_gap: Some(gap) })
}

fn validate_postgres(bed: Testbed, rep: &Reporter) -> Result<Checked, MigrationError> {
    let mut sb = ServiceBed::create(bed, "postgres", &postgres::spec(), postgres::prepare, &|m| rep.note(m))?;
    postgres::wait_ready(&mut sb)?;
    let src_pidns = pid_namespace(sb.source_pid()?)?;
    rep.note(format!("{} answers; pgbench -i -s 10", sb.id));
    postgres::init_pgbench(&mut sb)?;
    rep.note(format!(
        "pgbench: {} clients, {} transactions each, {} per second in all",
        postgres::PGBENCH_CLIENTS,
        postgres::PGBENCH_TX_PER_CLIENT,
        postgres::PGBENCH_RATE
    ));
    let mut pgbench = postgres::Pgbench::start(&mut sb, true)?;
    pgbench.wait_progress(3)?;
    let sender = migrate(&mut sb, rep)?;
    if !pgbench.running() {
        return Err(MigrationError::Other(format!("pgbench ended before the migration did: {}", pgbench.stderr().trim())));
    }
    let log_dir = pgbench.log_dir.clone();
    let outcome = pgbench.wait(Duration::from_secs(300))?;
    let committed = outcome.all_committed()?;
    let gap = log_dir.as_deref().map(postgres::Pgbench::longest_gap).transpose()?;
    // Every committed transaction wrote one history row.
    postgres::check_history(&mut sb, committed)?;
    one_copy_then_clean(sb, src_pidns, |_| Ok(()), rep)?;
    Ok(Checked { sender, answers: Some(committed), longest_gap: gap })
}
