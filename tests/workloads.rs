//! Real services in Debian root filesystems migrate with their clients
//! connected (issue 16).
//!
//! Each test builds (or takes from the cache) a Debian bookworm rootfs
//! made by mmdebstrap from Debian's own packages
//! (migration_testbed::debian), copies it into a bundle, starts a
//! real service in it on the source "host" in a named network namespace
//! wired to a bridge (as tests/network.rs does), and drives it from a
//! client in a third namespace that holds its connection across a
//! migration with `--tcp-established`, checking every answer. Afterwards:
//! the service's own data is whole, and exactly one copy of the container
//! exists (the source's runc state and processes gone, the destination's
//! running, the testbed clean).
//!
//! The beds, services and clients are migration_testbed::services,
//! ::redis, ::nginx and ::postgres, which `ctmigrate validate --workload`
//! runs too; what is here are the tests' own checks and the lock holder.
//!
//! Run one at a time (`-- --test-threads=1`): each copies a 540 MB rootfs
//! and moves a service of up to a few hundred MiB.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use migration_testbed::debian;
use migration_testbed::services::{self, processes_in, pseudo_random, run_token, Client, ServiceBed, ServiceSpec};
use migration_testbed::{join_ipc_namespace, join_network_namespace, nginx, postgres, redis, ChildProcess, FixtureContainer, Side, Workload};
use migration_engine::MigrationError;

// ---------------------------------------------------------------------------
// The bed: testbed, network, a Debian rootfs copy and the service in it
// (migration_testbed::services), with the tests' failures.
// ---------------------------------------------------------------------------

/// The shared code's errors, as test failures.
trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for Result<T, MigrationError> {
    #[track_caller]
    fn or_panic(self) -> T {
        self.unwrap_or_else(|e| panic!("{e}"))
    }
}

trait AssertProgress {
    fn assert_progress(&mut self, more: u64, within: Duration, context: &str);
}

impl<S: Send + 'static> AssertProgress for Client<S> {
    /// Waits until `more` requests beyond those done now have succeeded.
    #[track_caller]
    fn assert_progress(&mut self, more: u64, within: Duration, context: &str) {
        self.wait_progress(more, within, context).or_panic()
    }
}

fn skip_or_panic(why: &str) -> Option<ServiceBed> {
    if std::env::var("CTMIGRATE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("root test cannot run: {why} (CTMIGRATE_REQUIRE_ROOT_TESTS=1)");
    }
    eprintln!("SKIPPED: {why}; set up with ./install.sh and run as root");
    None
}

/// Builds the bed: `prepare` adds the test's files to the rootfs copy
/// before the container starts.
fn service_bed(prefix: &str, name: &str, spec: ServiceSpec, prepare: impl FnOnce(&Path)) -> Option<ServiceBed> {
    let bed = common::testbed(prefix)?;
    if let Some(why) = debian::missing_tool() {
        return skip_or_panic(&why);
    }
    let prepare = |rootfs: &Path| {
        prepare(rootfs);
        Ok(())
    };
    let sb = ServiceBed::create(bed, name, &spec, prepare, &|m| eprintln!("{m}"));
    Some(sb.unwrap_or_else(|e| panic!("setting up the {name} container: {e}")))
}

fn pid_namespace(pid: i32) -> u64 {
    services::pid_namespace(pid).or_panic()
}

fn write_file(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) {
    services::write_file(path, data, mode, owner).or_panic()
}

/// Migrates the container with `--tcp-established` to the destination
/// (see ServiceBed::migrate). Panics with the sender's and the receiver's
/// messages if it fails (the clients' guards then stop them).
fn migrate(sb: &mut ServiceBed) -> serde_json::Value {
    let migrated = sb.migrate(common::port()).or_panic();
    let mut result = migrated.sender;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["rootfs_verified"], true, "the destination proved its rootfs the source's: {result}");
    assert_eq!(migrated.receiver["rootfs_verified"], true);
    eprintln!(
        "migrated {} in {:?}: frozen_ms={} bytes_sent={} rootfs_verified={} frozen_phases={}",
        sb.id, migrated.took, result["frozen_ms"], result["bytes_sent"], result["rootfs_verified"], result["frozen_phases"]
    );
    // For the benchmark: where the receiver's time went.
    result["receiver_rootfs"] = migrated.receiver["rootfs"].clone();
    result["receiver_phases"] = migrated.receiver_phases.into();
    result
}

/// Deletes the destination's container, checks that nothing of the
/// migration is left on either host, and prints the timings.
fn finish(sb: ServiceBed, dst: FixtureContainer, test: &str) {
    let timings = sb.finish(dst).or_panic();
    eprintln!("{}", timings.line(test));
}

/// The floor the benchmark sets ctmigrate against: `runc checkpoint` to
/// a tmpfs and `runc restore` from it on the source host: the same
/// container, rootfs and network namespace, nothing copied or sent.
fn floor(sb: &mut ServiceBed) -> serde_json::Value {
    let images = sb.bed.dir.join("floor-images");
    let work = sb.bed.dir.join("floor-work");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8g", "tmpfs"]).arg(&images).status().unwrap();
    assert!(mounted.success(), "mounting the floor's images tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(images.clone());
    let runc = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(&sb.bed.runc_binary)
            .arg("--root")
            .arg(&sb.bed.src_runc.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let log = if args[0] == "checkpoint" { "dump.log" } else { "restore.log" };
        assert!(
            out.status.success(),
            "runc {:?}: {}
{}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim(),
            container_runtime::runc::criu_log_errors(&work.join(log)).unwrap_or_default()
        );
    };
    let common: [&std::ffi::OsStr; 6] =
        ["--tcp-established".as_ref(), "--file-locks".as_ref(), "--image-path".as_ref(), images.as_os_str(), "--work-path".as_ref(), work.as_os_str()];
    let t = Instant::now();
    let mut args: Vec<&std::ffi::OsStr> = vec!["checkpoint".as_ref()];
    args.extend(common);
    args.push(sb.id.as_ref());
    runc(&args);
    let checkpoint_ms = t.elapsed().as_millis() as u64;
    let bundle = sb.src.bundle.clone();
    let mut args: Vec<&std::ffi::OsStr> = vec!["restore".as_ref(), "-d".as_ref()];
    args.extend(common);
    args.extend(["--bundle".as_ref(), bundle.as_os_str(), sb.id.as_ref()]);
    runc(&args);
    let frozen_ms = t.elapsed().as_millis() as u64;
    let du = Command::new("du").args(["-sb"]).arg(&images).output().unwrap();
    let image_bytes: u64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
    sb.timings.push(("floor: checkpoint + restore", t.elapsed()));
    serde_json::json!({
        "frozen_ms": frozen_ms,
        "frozen_phases": {"checkpoint_ms": checkpoint_ms, "restore_ms": frozen_ms - checkpoint_ms},
        "image_bytes": image_bytes,
    })
}

// ---------------------------------------------------------------------------
// PostgreSQL 15 under pgbench (migration_testbed::postgres).
// ---------------------------------------------------------------------------

/// A PostgreSQL container, answering, with pgbench's tables (scale 10: a
/// million accounts); also returns postgres's uid and the source's pid
/// namespace.
fn postgres_bed(prefix: &str) -> Option<(ServiceBed, u32, u64)> {
    let mut sb = service_bed(prefix, "postgres", postgres::spec(), |rootfs| postgres::prepare(rootfs).or_panic())?;
    let rootfs = sb.rootfs();
    postgres::wait_ready(&mut sb).or_panic();

    // PostgreSQL runs as postgres: every process of the container.
    let (pg_uid, _) = debian::user_ids(&rootfs, "postgres").unwrap();
    let src_pidns = pid_namespace(sb.source_pid().or_panic());
    let procs = processes_in(src_pidns);
    assert!(procs.len() >= 4 && procs.iter().all(|p| p.uid == pg_uid), "not all PostgreSQL processes run as postgres: {procs:?}");

    postgres::init_pgbench(&mut sb).or_panic();
    Some((sb, pg_uid, src_pidns))
}

#[test]
fn workload_postgres_pgbench_commits_every_transaction_across_migration() {
    let Some((mut sb, pg_uid, src_pidns)) = postgres_bed("wpg") else { return };
    let mut pgbench = postgres::Pgbench::start(&mut sb, false).or_panic();
    pgbench.wait_progress(3).or_panic();

    migrate(&mut sb);
    let migrated_after = pgbench.started.elapsed();
    // Mid-run: pgbench was still running when the migration completed.
    assert!(
        pgbench.running(),
        "pgbench finished before the migration did ({migrated_after:?}): raise PGBENCH_TX_PER_CLIENT\n{}",
        pgbench.stderr()
    );
    let started = pgbench.started;
    let outcome = pgbench.wait(Duration::from_secs(300)).or_panic();
    sb.timings.push(("pgbench run (migration included)", started.elapsed()));
    let slowest = outcome
        .stderr
        .lines()
        .filter(|l| l.starts_with("progress:"))
        .max_by(|a, b| {
            let lat = |l: &str| l.split("lat ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            lat(a).total_cmp(&lat(b))
        })
        .unwrap_or("");
    eprintln!("pgbench summary:\n{}\nslowest second: {slowest}", outcome.stdout);
    let total = outcome.all_committed().or_panic();

    // Every committed transaction wrote one history row; the balances
    // agree with the history.
    postgres::check_history(&mut sb, total).or_panic();

    let dst = sb.exactly_one_copy(src_pidns).or_panic();
    let dst_procs = processes_in(pid_namespace(sb.bed.dst_runc.running(&sb.id).unwrap().pid));
    assert!(dst_procs.iter().all(|p| p.uid == pg_uid), "destination processes not all postgres: {dst_procs:?}");
    finish(sb, dst, "workload_postgres");
}

// ---------------------------------------------------------------------------
// Redis with a million keys, one client doing SET/GET
// (migration_testbed::redis).
// ---------------------------------------------------------------------------

/// A Redis container (as user redis) holding a million keys (key:N =
/// value:N), with one connection to it; also returns redis's uid and the
/// source's pid namespace.
fn redis_bed(prefix: &str) -> Option<(ServiceBed, TcpStream, redis::Resp, u32, u64)> {
    let mut sb = service_bed(prefix, "redis", redis::spec(), |_| {})?;
    let (stream, mut conn) = redis::connect(&mut sb).or_panic();
    let (redis_uid, _) = debian::user_ids(&sb.rootfs(), "redis").unwrap();
    let src_pidns = pid_namespace(sb.source_pid().or_panic());
    let procs = processes_in(src_pidns);
    assert!(!procs.is_empty() && procs.iter().all(|p| p.uid == redis_uid), "redis does not run as redis: {procs:?}");

    redis::populate(&mut sb, &mut conn).or_panic();
    Some((sb, stream, conn, redis_uid, src_pidns))
}

#[test]
fn workload_redis_million_keys_one_connection_every_value_checked() {
    let Some((mut sb, stream, mut conn, redis_uid, src_pidns)) = redis_bed("wrd") else { return };
    let run_id = conn.run_id().unwrap();
    let token = run_token();
    let mut client = redis::client(&stream, conn, &token).or_panic();
    client.assert_progress(2_000, Duration::from_secs(60), "before migrating");

    migrate(&mut sb);
    client.assert_progress(5_000, Duration::from_secs(120), "after migrating");
    let (mut conn, steps, gap) = client.stop().or_panic();
    eprintln!("redis client: {steps} SET/GET rounds on one connection, longest gap {gap:?}");

    // Same server process (not restarted), every key there, every value
    // right: the client's and the million populated ones.
    assert_eq!(conn.run_id().unwrap(), run_id, "redis was restarted");
    redis::check_every_value(&mut conn, &token, steps).or_panic();
    drop(conn);

    let dst = sb.exactly_one_copy(src_pidns).or_panic();
    let dst_procs = processes_in(pid_namespace(sb.bed.dst_runc.running(&sb.id).unwrap().pid));
    assert!(dst_procs.iter().all(|p| p.uid == redis_uid), "destination redis not running as redis: {dst_procs:?}");
    finish(sb, dst, "workload_redis");
}

/// Draining a host with a real service on it: Debian's redis, a client on
/// one connection checking every answer, and beside it a two-container
/// pod shaped as Kubernetes makes one (the app in the pause container's
/// network and IPC namespaces) leave with one `evacuate`: every value
/// arrives, the pod whole, and nothing is left on the source.
#[test]
fn workload_redis_and_a_pod_leave_with_one_evacuate() {
    let Some((sb, stream, mut conn, redis_uid, src_pidns)) = redis_bed("wev") else { return };
    let run_id = conn.run_id().unwrap();
    let token = run_token();
    let mut client = redis::client(&stream, conn, &token).or_panic();
    client.assert_progress(2_000, Duration::from_secs(60), "before evacuating");

    let tag = sb.bed.tag.clone();
    let start = |id: String, pod_of: Option<i32>| {
        let bundle = sb.bed.fixture_bundle(&id, &Workload::Counter).unwrap();
        if let Some(pid) = pod_of {
            join_network_namespace(&bundle, Path::new(&format!("/proc/{pid}/ns/net"))).unwrap();
            join_ipc_namespace(&bundle, Path::new(&format!("/proc/{pid}/ns/ipc"))).unwrap();
        }
        let c = FixtureContainer::start(sb.bed.src_runc.clone(), &id, &bundle).unwrap();
        let (token, _) = common::counter_at_least(&c.rootfs(), 3);
        (c, token)
    };
    let pause = start(format!("pause-{tag}"), None);
    let app = start(format!("app-{tag}"), Some(sb.bed.src_runc.state(&pause.0.id).unwrap().pid));

    let port = common::port();
    let _receiver = sb.bed.spawn_receiver(port, &["--bridge", &sb.net.bridge, "--max-migrations", "4"], &[]).or_panic();
    let mut evacuate = ChildProcess::spawn(sb.bed.evacuate_command(port, &["--tcp-established", "--parallel", "2"])).or_panic();
    // The client's route moves once the destination runs redis (what the
    // receiver's gratuitous ARP does on a shared segment).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut routed = false;
    while matches!(evacuate.child.try_wait(), Ok(None)) && Instant::now() < deadline {
        if !routed && sb.bed.dst_runc.live_init_pid(&sb.id).is_ok() {
            sb.net.route_via(Side::Destination).or_panic();
            routed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let code = evacuate.wait(Duration::from_secs(5));
    assert_eq!(code, Some(0), "evacuate failed: {}", evacuate.stderr());
    sb.net.route_via(Side::Destination).or_panic();
    let summary = evacuate.events.iter().find(|e| e["event"] == "summary").cloned().expect("no summary event");
    assert_eq!((summary["moved"].as_u64(), summary["stayed"].as_u64()), (Some(3), Some(0)), "{summary}");

    client.assert_progress(5_000, Duration::from_secs(120), "after evacuating");
    let (mut conn, steps, gap) = client.stop().or_panic();
    eprintln!("redis client: {steps} SET/GET rounds on one connection across the evacuation, longest gap {gap:?}");
    assert_eq!(conn.run_id().unwrap(), run_id, "redis was restarted");
    redis::check_every_value(&mut conn, &token, steps).or_panic();
    drop(conn);

    // The pod runs whole on the destination, counting on.
    for (c, token) in [&pause, &app] {
        let rootfs = sb.bed.dst_bundles().join(&c.id).join("rootfs");
        let (_, now) = migration_testbed::read_counter(&rootfs).unwrap();
        common::assert_counting_on(&rootfs, token, now);
    }
    let dst_pid = |id: &str| sb.bed.dst_runc.state(id).unwrap().pid;
    for kind in ["net", "ipc"] {
        let ns = |id: &str| std::fs::metadata(format!("/proc/{}/ns/{kind}", dst_pid(id))).unwrap().ino();
        assert_eq!(ns(&pause.0.id), ns(&app.0.id), "the pod's members are in two {kind} namespaces on the destination");
    }
    let dst = sb.exactly_one_copy(src_pidns).or_panic();
    let dst_procs = processes_in(pid_namespace(dst_pid(&sb.id)));
    assert!(dst_procs.iter().all(|p| p.uid == redis_uid), "destination redis not running as redis: {dst_procs:?}");
    assert!(sb.bed.src_runc.list().unwrap().is_empty(), "the source still has {:?}", sb.bed.src_runc.list());
    // The pod's copies deleted, nothing of it remains; finish() checks
    // the rest.
    for (c, _) in [&pause, &app] {
        drop(sb.bed.dst_container(&c.id));
        let _ = std::fs::remove_dir_all(sb.bed.dst_bundles().join(&c.id));
    }
    let netns = PathBuf::from(format!("/run/netns/ctmigrate-{}", pause.0.id));
    assert!(!netns.exists(), "{} outlived the pod", netns.display());
    // The source's handles go before the testbed (their drop runs runc
    // there, which would make its runtime root again).
    drop((pause, app));
    finish(sb, dst, "workload_redis_evacuated");
}

// ---------------------------------------------------------------------------
// nginx with www-data workers, a keep-alive client checking each body
// (migration_testbed::nginx).
// ---------------------------------------------------------------------------

/// An nginx container serving a 4 MiB file, with one connection to it;
/// also returns the file's SHA-256, www-data's uid and the source's pid
/// namespace.
fn nginx_bed(prefix: &str) -> Option<(ServiceBed, TcpStream, String, u32, u64)> {
    let (blob, digest) = nginx::blob();
    let mut sb = service_bed(prefix, "nginx", nginx::spec(), |rootfs| nginx::prepare(rootfs, &blob).or_panic())?;
    let src_pidns = pid_namespace(sb.source_pid().or_panic());
    // Fails unless there are an nginx master as root and two www-data
    // workers.
    let (stream, www_uid) = nginx::connect(&mut sb, src_pidns).or_panic();
    Some((sb, stream, digest, www_uid, src_pidns))
}

#[test]
fn workload_nginx_keepalive_downloads_arrive_intact() {
    let Some((mut sb, stream, digest, www_uid, src_pidns)) = nginx_bed("wng") else { return };
    let mut client = nginx::client(&stream, &digest).or_panic();
    client.assert_progress(20, Duration::from_secs(60), "before migrating");

    migrate(&mut sb);
    client.assert_progress(50, Duration::from_secs(120), "after migrating");
    let (_, downloads, gap) = client.stop().or_panic();
    eprintln!("http client: {downloads} downloads of {} bytes on one connection, each digest checked; longest gap {gap:?}", nginx::BLOB_LEN);
    drop(stream);

    let dst = sb.exactly_one_copy(src_pidns).or_panic();
    let dst_pid = sb.bed.dst_runc.running(&sb.id).unwrap().pid;
    let dst_procs = processes_in(pid_namespace(dst_pid));
    assert!(nginx::workers_ok(&dst_procs, dst_pid, www_uid), "destination: expected an nginx master as root and two www-data workers: {dst_procs:?}");
    let served = std::fs::read(dst.rootfs().join(nginx::BLOB_PATH)).unwrap();
    assert_eq!(services::sha256_hex(&served), digest, "the served file changed on the destination");
    finish(sb, dst, "workload_nginx");
}

// ---------------------------------------------------------------------------
// FIFOs, hard links, security.capability, and held file locks.
// ---------------------------------------------------------------------------

const LOCK_PORT: u16 = 7070;
const CTM_DIR: &str = "var/lib/ctm";

/// The lock holder: takes a POSIX (fcntl) write lock, a flock lock and an
/// OFD write lock on three rootfs files, keeps the FIFO open read-write
/// with bytes queued in it, and answers `PING n` with `PONG n TOKEN` (the
/// token is drawn at start: a restart would show) and `FIFO` with the hex
/// of what it reads from the FIFO.
const LOCK_HOLDER: &str = r#"
import fcntl, os, socket, struct, uuid
D = '/var/lib/ctm'
token = uuid.uuid4().hex
posix = open(D + '/posix.lock', 'r+b')
fcntl.lockf(posix, fcntl.LOCK_EX | fcntl.LOCK_NB)
fl = open(D + '/flock.lock', 'r+b')
fcntl.flock(fl, fcntl.LOCK_EX | fcntl.LOCK_NB)
ofd = os.open(D + '/ofd.lock', os.O_RDWR)
fcntl.fcntl(ofd, fcntl.F_OFD_SETLK, struct.pack('hhxxxxqqixxxx', fcntl.F_WRLCK, 0, 0, 0, 0))
fifo = os.open(D + '/fifo', os.O_RDWR | os.O_NONBLOCK)
os.write(fifo, b'queued before the migration\n')
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('0.0.0.0', 7070))
srv.listen(4)
with open(D + '/ready.tmp', 'w') as f:
    f.write(token + '\n')
os.rename(D + '/ready.tmp', D + '/ready')
while True:
    conn, _ = srv.accept()
    r = conn.makefile('rb')
    for line in r:
        w = line.split()
        if len(w) == 2 and w[0] == b'PING':
            conn.sendall(b'PONG ' + w[1] + b' ' + token.encode() + b'\n')
        elif w == [b'FIFO']:
            try:
                data = os.read(fifo, 65536)
            except BlockingIOError:
                data = b''
            conn.sendall(b'FIFO ' + data.hex().encode() + b'\n')
        else:
            conn.sendall(b'ERR\n')
    r.close()
    conn.close()
"#;

/// A file capability: VFS_CAP_REVISION_2 with the effective flag,
/// cap_net_bind_service permitted (what `setcap cap_net_bind_service=ep`
/// writes).
const CAP_XATTR: [u8; 20] = [0x01, 0, 0, 0x02, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const USER_XATTR: &[u8] = b"kept across the migration";
const HARD_LINKS: [&str; 3] = ["var/lib/ctm/data.bin", "var/lib/ctm/data.link", "srv/data.link"];
const IDLE_FIFO_OWNER: (u32, u32) = (1234, 4321);

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: `p` and `n` are NUL-terminated and live across the call;
    // `value` is readable for `value.len()` bytes.
    let rc = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setting {name} on {}: {}", path.display(), std::io::Error::last_os_error());
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `p` and `n` are NUL-terminated and live across the call;
    // `buf` is writable for `buf.len()` bytes.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (rc >= 0).then(|| {
        buf.truncate(rc as usize);
        buf
    })
}

fn prepare_lock_rootfs(rootfs: &Path) {
    let d = rootfs.join(CTM_DIR);
    std::fs::create_dir_all(&d).unwrap();
    write_file(&rootfs.join("ctm/lockholder.py"), LOCK_HOLDER.as_bytes(), 0o644, None);
    for f in ["posix.lock", "flock.lock", "ofd.lock"] {
        write_file(&d.join(f), format!("{f}\n").as_bytes(), 0o644, None);
    }
    // The FIFO the holder keeps open, and one nobody opens.
    nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    nix::unistd::mkfifo(&d.join("idle.fifo"), nix::sys::stat::Mode::from_bits_truncate(0o604)).unwrap();
    std::fs::set_permissions(d.join("idle.fifo"), std::fs::Permissions::from_mode(0o604)).unwrap();
    std::os::unix::fs::chown(d.join("idle.fifo"), Some(IDLE_FIFO_OWNER.0), Some(IDLE_FIFO_OWNER.1)).unwrap();
    // Three names of one file, in two directories.
    write_file(&rootfs.join(HARD_LINKS[0]), &pseudo_random(100_000, 0x11), 0o640, Some((33, 33)));
    for l in &HARD_LINKS[1..] {
        std::fs::hard_link(rootfs.join(HARD_LINKS[0]), rootfs.join(l)).unwrap();
    }
    set_xattr(&rootfs.join(HARD_LINKS[0]), "user.ctmigrate", USER_XATTR);
    // A binary with a file capability.
    let cap = rootfs.join("usr/local/bin/ctm-cap");
    std::fs::copy(rootfs.join("usr/bin/true"), &cap).unwrap();
    std::fs::set_permissions(&cap, std::fs::Permissions::from_mode(0o755)).unwrap();
    set_xattr(&cap, "security.capability", &CAP_XATTR);
}

/// The rootfs entries the test made, as they must be on either side.
fn assert_tree(rootfs: &Path, side: &str) {
    let d = rootfs.join(CTM_DIR);
    for (name, mode, owner) in [("fifo", 0o640, (0, 0)), ("idle.fifo", 0o604, IDLE_FIFO_OWNER)] {
        let m = std::fs::symlink_metadata(d.join(name)).unwrap_or_else(|e| panic!("{side}: {name}: {e}"));
        assert!(m.file_type().is_fifo(), "{side}: {name} is not a FIFO: {:?}", m.file_type());
        assert_eq!(m.mode() & 0o7777, mode, "{side}: {name}'s mode");
        assert_eq!((m.uid(), m.gid()), owner, "{side}: {name}'s owner");
    }
    let metas: Vec<std::fs::Metadata> = HARD_LINKS
        .iter()
        .map(|l| std::fs::symlink_metadata(rootfs.join(l)).unwrap_or_else(|e| panic!("{side}: {l}: {e}")))
        .collect();
    for (l, m) in HARD_LINKS.iter().zip(&metas) {
        assert_eq!(m.ino(), metas[0].ino(), "{side}: {l} is not a hard link of {}", HARD_LINKS[0]);
        assert_eq!(m.nlink(), 3, "{side}: {l} has {} links", m.nlink());
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 33, 33), "{side}: {l}'s mode or owner");
    }
    assert_eq!(std::fs::read(rootfs.join(HARD_LINKS[2])).unwrap(), pseudo_random(100_000, 0x11), "{side}: the linked file's bytes");
    assert_eq!(get_xattr(&rootfs.join(HARD_LINKS[0]), "user.ctmigrate").as_deref(), Some(USER_XATTR), "{side}: user.ctmigrate");
    // Debian's own hard links.
    let perl = std::fs::metadata(rootfs.join("usr/bin/perl")).unwrap();
    let perl5 = std::fs::metadata(rootfs.join("usr/bin/perl5.36.0")).unwrap();
    assert_eq!(perl.ino(), perl5.ino(), "{side}: usr/bin/perl and perl5.36.0 are not one file");
    let cap = rootfs.join("usr/local/bin/ctm-cap");
    assert_eq!(get_xattr(&cap, "security.capability").as_deref(), Some(&CAP_XATTR[..]), "{side}: ctm-cap's security.capability");
    assert_eq!(std::fs::metadata(&cap).unwrap().mode() & 0o7777, 0o755, "{side}: ctm-cap's mode");
}

/// Who holds a lock on `path`, probed from the host through a descriptor
/// of its own: the POSIX write lock's holder (`F_GETLK`), whether an OFD
/// write lock is held (`F_OFD_GETLK`), whether flock is (a non-blocking
/// `flock` refused).
#[derive(Debug, PartialEq)]
struct LockProbe {
    posix_holder: Option<i32>,
    ofd_held: bool,
    flock_held: bool,
}

fn getlk(path: &Path, cmd: libc::c_int) -> libc::flock {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    // SAFETY: `flock` is plain integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: `cmd` is F_GETLK or F_OFD_GETLK, which read and write one
    // `struct flock`: `fl` is one, initialized; `f` is open for the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    assert_eq!(rc, 0, "fcntl on {}: {}", path.display(), std::io::Error::last_os_error());
    // Closing `f` drops no lock of the container's: this process holds none.
    fl
}

fn probe_locks(rootfs: &Path) -> LockProbe {
    use std::os::fd::AsRawFd;
    let d = rootfs.join(CTM_DIR);
    let posix = getlk(&d.join("posix.lock"), libc::F_GETLK);
    let ofd = getlk(&d.join("ofd.lock"), libc::F_OFD_GETLK);
    let f = std::fs::File::open(d.join("flock.lock")).unwrap();
    // SAFETY: flock(2) on the descriptor `f` owns, open for the call; no
    // memory is passed.
    let flock_held = if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        false
    } else {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "flock probe: {e}");
        true
    };
    LockProbe {
        posix_holder: (posix.l_type != libc::F_UNLCK as i16).then_some(posix.l_pid),
        ofd_held: ofd.l_type == libc::F_WRLCK as i16,
        flock_held,
    }
}

/// /proc/locks rows on `path`'s inode: (kind, access, pid).
fn proc_locks(path: &Path) -> Vec<(String, String, i64)> {
    let ino = std::fs::metadata(path).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: POSIX  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
            let dev_ino = f.get(5)?;
            (dev_ino.rsplit(':').next()?.parse::<u64>().ok()? == ino).then(|| (f[1].to_string(), f[3].to_string(), f[4].parse().unwrap_or(i64::MIN)))
        })
        .collect()
}

fn assert_locks_held(rootfs: &Path, holder: i32, side: &str) {
    let d = rootfs.join(CTM_DIR);
    let probe = probe_locks(rootfs);
    assert_eq!(probe, LockProbe { posix_holder: Some(holder), ofd_held: true, flock_held: true }, "{side}: the container's locks");
    let want = [("posix.lock", "POSIX", holder as i64), ("flock.lock", "FLOCK", holder as i64), ("ofd.lock", "OFDLCK", -1)];
    for (file, kind, pid) in want {
        let rows = proc_locks(&d.join(file));
        assert!(
            rows.iter().any(|(k, a, p)| k == kind && a == "WRITE" && *p == pid),
            "{side}: /proc/locks has no {kind} WRITE lock by {pid} on {file}: {rows:?}"
        );
    }
}

#[test]
fn workload_fifo_hard_links_capabilities_and_locks_survive_migration() {
    let spec = ServiceSpec { args: vec!["/usr/bin/python3".into(), "-u".into(), "/ctm/lockholder.py".into()], user: None, cwd: "/" };
    let Some(mut sb) = service_bed("wlk", "locks", spec, prepare_lock_rootfs) else { return };
    let src_rootfs = sb.rootfs();
    let t = Instant::now();
    let token = common::wait_for(Duration::from_secs(30), || std::fs::read_to_string(src_rootfs.join(CTM_DIR).join("ready")).ok())
        .unwrap_or_else(|| panic!("the lock holder never got ready: {}", sb.service_log_hint()));
    let token = token.trim().to_string();
    let stream = sb.connect(LOCK_PORT, Duration::from_secs(30)).or_panic();
    sb.timings.push(("lock holder start", t.elapsed()));

    // On the source: the tree as made, the locks held by the holder (the
    // container's init), proven by the probes the destination gets.
    let src_pid = sb.source_pid().or_panic();
    let src_pidns = pid_namespace(src_pid);
    assert_tree(&src_rootfs, "source");
    assert_locks_held(&src_rootfs, src_pid, "source");

    let client = {
        let (mut r, mut w) = (BufReader::new(stream.try_clone().unwrap()), stream.try_clone().unwrap());
        let token = token.clone();
        Client::spawn("ping", &stream, (), move |_, n| {
            writeln!(w, "PING {n}").map_err(MigrationError::io("sending"))?;
            let mut l = String::new();
            r.read_line(&mut l).map_err(MigrationError::io("reading"))?;
            let want = format!("PONG {n} {token}\n");
            if l != want {
                return Err(MigrationError::Other(format!("answered {l:?}, expected {want:?} (a restarted holder draws a new token)")));
            }
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        })
        .or_panic()
    };
    let mut client = client;
    client.assert_progress(200, Duration::from_secs(30), "before migrating");

    migrate(&mut sb);
    client.assert_progress(500, Duration::from_secs(120), "after migrating");
    let (_, pings, gap) = client.stop().or_panic();
    eprintln!("lock holder client: {pings} pings on one connection, longest gap {gap:?}");

    let dst = sb.exactly_one_copy(src_pidns).or_panic();
    let dst_rootfs = dst.rootfs();
    let dst_pid = sb.bed.dst_runc.running(&sb.id).unwrap().pid;
    // The tree arrived as it was: FIFOs, hard links (one inode), xattrs.
    assert_tree(&dst_rootfs, "destination");
    // The locks are still the holder's.
    assert_locks_held(&dst_rootfs, dst_pid, "destination");

    // The FIFO the holder reads is the destination rootfs's FIFO, and what
    // was queued in it came along.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(dst_rootfs.join(CTM_DIR).join("fifo"))
            .expect("opening the destination's FIFO for writing (no reader?)");
        f.write_all(b"written after the migration\n").unwrap();
    }
    let (mut r, mut w) = (BufReader::new(stream.try_clone().unwrap()), stream.try_clone().unwrap());
    writeln!(w, "FIFO").unwrap();
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    let hex = l.trim().strip_prefix("FIFO ").unwrap_or_else(|| panic!("FIFO answered {l:?}"));
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "queued before the migration\nwritten after the migration\n",
        "what the holder read from its FIFO"
    );
    drop((r, w, stream));

    finish(sb, dst, "workload_locks");
}

// ---------------------------------------------------------------------------
// Benchmark (a report, not a test).
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Service {
    Postgres,
    Redis,
    Nginx,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MoveBy {
    Ctmigrate,
    Floor,
}

/// One service under its client, moved once: what the move cost and the
/// longest time the client waited between two answers. None: skipped.
fn bench_one(service: Service, how: MoveBy) -> Option<serde_json::Value> {
    let mv = |sb: &mut ServiceBed| match how {
        MoveBy::Ctmigrate => migrate(sb),
        MoveBy::Floor => floor(sb),
    };
    let (result, gap, timings) = match service {
        Service::Postgres => {
            let (mut sb, _, _) = postgres_bed("bpg")?;
            let mut pgbench = postgres::Pgbench::start(&mut sb, true).or_panic();
            pgbench.wait_progress(3).or_panic();
            let result = mv(&mut sb);
            assert!(pgbench.running(), "pgbench finished before the move did");
            let log_dir = pgbench.log_dir.clone().unwrap();
            pgbench.wait(Duration::from_secs(300)).or_panic().all_committed().or_panic();
            (result, postgres::Pgbench::longest_gap(&log_dir).or_panic(), sb.timings.clone())
        }
        Service::Redis => {
            let (mut sb, stream, conn, _, _) = redis_bed("brd")?;
            let mut client = redis::client(&stream, conn, &run_token()).or_panic();
            client.assert_progress(2_000, Duration::from_secs(60), "before the move");
            let result = mv(&mut sb);
            client.assert_progress(2_000, Duration::from_secs(120), "after the move");
            let (_, _, gap) = client.stop().or_panic();
            (result, gap, sb.timings.clone())
        }
        Service::Nginx => {
            let (mut sb, stream, digest, _, _) = nginx_bed("bng")?;
            let mut client = nginx::client(&stream, &digest).or_panic();
            client.assert_progress(20, Duration::from_secs(60), "before the move");
            let result = mv(&mut sb);
            client.assert_progress(20, Duration::from_secs(120), "after the move");
            let (_, _, gap) = client.stop().or_panic();
            (result, gap, sb.timings.clone())
        }
    };
    let mut sample = serde_json::json!({
        "service": format!("{service:?}").to_lowercase(),
        "method": format!("{how:?}").to_lowercase(),
        "client_gap_ms": gap.as_millis() as u64,
        "timings_s": timings.iter().map(|(w, d)| (w.to_string(), serde_json::json!(d.as_secs_f64()))).collect::<serde_json::Map<_, _>>(),
    });
    for field in ["frozen_ms", "frozen_phases", "bytes_sent", "total_ms", "image_bytes", "rootfs_verified", "rootfs", "receiver_rootfs", "receiver_phases"] {
        if !result[field].is_null() {
            sample[field] = result[field].clone();
        }
    }
    Some(sample)
}

/// For each real service: ctmigrate's frozen time, its phases, the bytes
/// it sent and the client's longest gap, against the floor (runc
/// checkpoint to tmpfs and restore, one host) on the same service under
/// the same client. Writes target/bench/workloads-bench.json and prints a
/// table for docs/performance.md.
///
/// cargo test --release --test workloads -- --ignored bench_workloads --nocapture
/// narrower: CTMIGRATE_BENCH_WORKLOADS=postgres,redis,nginx
///           CTMIGRATE_BENCH_METHODS=ctmigrate,floor
#[test]
#[ignore]
fn bench_workloads() {
    let wanted = |var: &str, name: &str| std::env::var(var).map(|v| v.split(',').any(|w| w.trim() == name)).unwrap_or(true);
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut samples = Vec::new();
    // Interleaved: each run moves every service once by each method.
    for run in 0..runs {
        for service in [Service::Postgres, Service::Redis, Service::Nginx] {
            if !wanted("CTMIGRATE_BENCH_WORKLOADS", &format!("{service:?}").to_lowercase()) {
                continue;
            }
            for how in [MoveBy::Ctmigrate, MoveBy::Floor] {
                if !wanted("CTMIGRATE_BENCH_METHODS", &format!("{how:?}").to_lowercase()) {
                    continue;
                }
                let Some(mut sample) = bench_one(service, how) else { return };
                sample["run"] = run.into();
                eprintln!("BENCH {sample}");
                samples.push(sample);
            }
        }
    }
    let median = |mut v: Vec<u64>| -> Option<u64> {
        v.sort_unstable();
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let mut table = String::from(
        "| service | method | runs | frozen ms (median) | client's longest gap ms (median) | sent MB | images MB |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    let mb = |v: Option<u64>| v.map(|b| format!("{:.1}", b as f64 / 1e6)).unwrap_or_else(|| "-".into());
    let mut ratios = String::new();
    for service in ["postgres", "redis", "nginx"] {
        let of = |m: &str, field: &str| -> Vec<u64> {
            samples.iter().filter(|s| s["service"] == service && s["method"] == m).filter_map(|s| s[field].as_u64()).collect()
        };
        for m in ["ctmigrate", "floor"] {
            let n = samples.iter().filter(|s| s["service"] == service && s["method"] == m).count();
            if n == 0 {
                continue;
            }
            table += &format!(
                "| {service} | {m} | {n} | {} | {} | {} | {} |\n",
                median(of(m, "frozen_ms")).map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                median(of(m, "client_gap_ms")).map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                mb(median(of(m, "bytes_sent"))),
                mb(median(of(m, "image_bytes"))),
            );
        }
        let ratio = |field: &str| match (median(of("ctmigrate", field)), median(of("floor", field))) {
            (Some(c), Some(f)) => format!("{:.2}", c as f64 / f.max(1) as f64),
            _ => "-".into(),
        };
        ratios += &format!("\n{service}: ctmigrate / floor, frozen time {}, client's longest gap {}", ratio("frozen_ms"), ratio("client_gap_ms"));
    }
    eprintln!("\n{table}{ratios}\n");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("workloads-bench.json"), serde_json::to_vec_pretty(&samples).unwrap()).unwrap();
}
