//! Real services in Debian root filesystems migrate with their clients
//! connected (issue 16).
//!
//! Each test builds (or takes from the cache) a Debian bookworm rootfs
//! made by mmdebstrap from Debian's own packages (tests/common/debian.rs),
//! copies it into a bundle, starts a real service in it on the source
//! "host" in a named network namespace wired to a bridge (as
//! tests/network.rs does), and drives it from a client in a third
//! namespace that holds its connection across a migration with
//! `--tcp-established`, checking every answer. Afterwards: the service's
//! own data is whole, and exactly one copy of the container exists (the
//! source's runc state and processes gone, the destination's running, the
//! testbed clean).
//!
//! Run one at a time (`-- --test-threads=1`): each copies a 540 MB rootfs
//! and moves a service of up to a few hundred MiB.

mod common;
#[path = "common/debian.rs"]
mod debian;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration_engine::testbed::{connect_from, join_network_namespace, ChildProcess, ContainerNetwork, FixtureContainer, HostPair, Side, Testbed};

// ---------------------------------------------------------------------------
// The bed: testbed, network, a Debian rootfs copy and the service in it.
// ---------------------------------------------------------------------------

/// What the container runs, as its config.json says.
struct ServiceSpec {
    args: Vec<String>,
    /// A user of the rootfs's /etc/passwd; None: root.
    user: Option<&'static str>,
    cwd: &'static str,
}

/// Docker's default capability set: what a service's root master process
/// (nginx's) needs to switch its workers to another user.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A testbed with the three-namespace network and a service container in
/// the source's named namespace. Fields drop in order: the container, the
/// client root, the network, the hosts.
struct ServiceBed {
    src: FixtureContainer,
    client_root: Option<debian::ReadOnlyRoot>,
    net: ContainerNetwork,
    bed: Testbed,
    id: String,
    /// The cached rootfs the bundle was copied from.
    cache: PathBuf,
    started: Instant,
    timings: Vec<(&'static str, Duration)>,
    /// The source container's pid namespace, held open so that its inode
    /// number (how the test finds the source's processes) is not given to
    /// another namespace once the source is gone.
    _src_pidns: std::fs::File,
    /// Held until the bed is gone: one real workload at a time, even when
    /// the harness runs tests in parallel.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let bed = common::testbed(prefix)?;
    if let Some(why) = debian::missing_tool() {
        return skip_or_panic(&why);
    }
    let mut timings = Vec::new();
    let (cache, built) = debian::SERVICES.get().unwrap_or_else(|e| panic!("building the Debian rootfs: {e}"));
    let t = Instant::now();
    if built > Duration::ZERO {
        timings.push(("rootfs build (mmdebstrap)", built));
    }
    let net = ContainerNetwork::create(&bed).expect("creating the network");
    // Ids are unique per test: runc puts a container without a cgroups
    // path in the cgroup named by its id.
    let id = format!("{name}-{}", bed.tag);
    let bundle = bed.dir.join("src-bundles").join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    let rootfs = bundle.join("rootfs");
    let copied = debian::copy_rootfs(&cache, &rootfs).unwrap_or_else(|e| panic!("copying the rootfs: {e}"));
    timings.push(("rootfs copy (cp -a)", copied));
    prepare(&rootfs);
    write_config(&bed, &bundle, &spec);
    join_network_namespace(&bundle, &net.container_netns_path()).unwrap();
    let src = FixtureContainer::start(bed.src_runc.clone(), &id, &bundle).unwrap_or_else(|e| panic!("starting {id}: {e}"));
    let pid = bed.src_runc.running(&id).unwrap_or_else(|e| panic!("{id} did not start: {e}")).pid;
    let src_pidns = std::fs::File::open(format!("/proc/{pid}/ns/pid")).unwrap();
    timings.push(("bundle and container start", t.elapsed() - copied));
    Some(ServiceBed { src, client_root: None, net, bed, id, cache, started, timings, _src_pidns: src_pidns, _serial: serial })
}

fn write_config(bed: &Testbed, bundle: &Path, spec: &ServiceSpec) {
    let _ = std::fs::remove_file(bundle.join("config.json"));
    let out = Command::new(&bed.runc_binary).arg("spec").arg("--bundle").arg(bundle).output().unwrap();
    assert!(out.status.success(), "runc spec: {}", String::from_utf8_lossy(&out.stderr));
    let path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let p = &mut cfg["process"];
    p["terminal"] = false.into();
    p["args"] = spec.args.clone().into();
    p["cwd"] = spec.cwd.into();
    p["env"] = serde_json::json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root"]);
    if let Some(user) = spec.user {
        let (uid, gid) = debian::user_ids(&bundle.join("rootfs"), user).unwrap();
        p["user"] = serde_json::json!({"uid": uid, "gid": gid});
        let home = passwd_home(&bundle.join("rootfs"), user);
        p["env"].as_array_mut().unwrap()[2] = format!("HOME={home}").into();
    }
    for set in ["bounding", "effective", "permitted"] {
        p["capabilities"][set] = DEFAULT_CAPS.into();
    }
    cfg["root"]["readonly"] = false.into();
    cfg["hostname"] = "ctmigrate-workload".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
}

fn passwd_home(rootfs: &Path, user: &str) -> String {
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() > 5 && f[0] == user).map(|f| f[5].to_string()).unwrap()
}

/// A process as /proc shows it from the host.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    uid: u32,
    name: String,
}

fn pid_namespace(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/pid")).unwrap_or_else(|e| panic!("pid namespace of {pid}: {e}")).ino()
}

/// Every process of the host in the pid namespace `ns`.
fn processes_in(ns: u64) -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino()).ok() != Some(ns) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string()).unwrap_or_default();
        let uid = field("Uid:").split_whitespace().next().and_then(|u| u.parse().ok()).unwrap_or(u32::MAX);
        out.push(Proc { pid, uid, name: field("Name:") });
    }
    out
}

impl ServiceBed {
    fn rootfs(&self) -> PathBuf {
        self.src.rootfs()
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.net.container_ip, port))
    }

    /// One connection from the client namespace, retried until the
    /// service listens.
    fn connect(&self, port: u16, within: Duration) -> TcpStream {
        let addr = self.addr(port);
        let stream = common::wait_for(within, || connect_from(&self.net.client, addr).ok())
            .unwrap_or_else(|| panic!("nothing answered at {addr} within {within:?}; {}", self.service_log_hint()));
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
        stream
    }

    fn service_log_hint(&self) -> String {
        match self.bed.src_runc.state(&self.id) {
            Ok(s) => format!("the container is {}", s.status),
            Err(e) => format!("the container: {e}"),
        }
    }

    /// The cached rootfs, read-only at a path of this test's own, for
    /// clients run from it with chroot.
    fn client_root(&mut self) -> PathBuf {
        if self.client_root.is_none() {
            let at = self.bed.dir.join("client-root");
            self.client_root = Some(debian::ReadOnlyRoot::mount(&self.cache, &at).unwrap_or_else(|e| panic!("{e}")));
        }
        self.client_root.as_ref().unwrap().path.clone()
    }

    /// `program` (a path inside the Debian rootfs) run by chroot into the
    /// read-only client root, in the client's network namespace.
    fn client_command(&mut self, program: &str) -> Command {
        let root = self.client_root();
        let mut c = HostPair::command_in(&self.net.client, "chroot");
        c.arg(root).arg(program);
        c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("LANG", "C.UTF-8").env("HOME", "/nonexistent");
        c
    }

    fn source_pid(&self) -> i32 {
        self.bed.src_runc.running(&self.id).unwrap_or_else(|e| panic!("the source container: {e}")).pid
    }

    /// Migrates the container with `--tcp-established` to the destination,
    /// whose receiver rebuilds its network on the destination's bridge,
    /// and points the client's route there. Panics with the sender's and
    /// the receiver's messages if it fails (the clients' guards then stop
    /// them).
    fn migrate(&mut self) -> serde_json::Value {
        let port = common::port();
        let t = Instant::now();
        let mut receiver = self.bed.spawn_receiver(port, &["--once", "--bridge", &self.net.bridge], &[]).unwrap();
        let mut sender = ChildProcess::spawn(self.bed.send_command(&self.id, port, &["--tcp-established"])).unwrap();
        // The client's route moves as soon as the destination runs the
        // container (what the receiver's gratuitous ARP does on a shared
        // segment), not when the sender is done.
        let mut moved = false;
        let deadline = Instant::now() + Duration::from_secs(900);
        while matches!(sender.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            // (runc's state file and /proc, read without running runc.)
            if !moved && self.bed.dst_runc.live_init_pid(&self.id).is_ok() {
                self.net.route_via(Side::Destination).unwrap();
                moved = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let code = sender.wait(Duration::from_secs(5));
        let received = receiver.wait(Duration::from_secs(120));
        let took = t.elapsed();
        self.timings.push(("migration (receiver start to sender exit)", took));
        if code != Some(0) && moved {
            // Rolled back: the source runs on.
            self.net.route_via(Side::Source).unwrap();
        }
        assert_eq!(
            code,
            Some(0),
            "the migration failed (exit {code:?}) after {took:?}:\nsender: {}\nreceiver: {}",
            sender.stderr().trim(),
            receiver.stderr().trim()
        );
        assert_eq!(received, Some(0), "receiver: {}", receiver.stderr());
        let result = sender.result().expect("a result event").clone();
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["rootfs_verified"], true, "the destination proved its rootfs the source's: {result}");
        assert_eq!(receiver.result().expect("receiver result")["rootfs_verified"], true);
        eprintln!(
            "migrated {} in {took:?}: frozen_ms={} bytes_sent={} rootfs_verified={} frozen_phases={}",
            self.id, result["frozen_ms"], result["bytes_sent"], result["rootfs_verified"], result["frozen_phases"]
        );
        self.net.route_via(Side::Destination).unwrap();
        result
    }

    /// The floor the benchmark sets ctmigrate against: `runc checkpoint` to
    /// a tmpfs and `runc restore` from it on the source host: the same
    /// container, rootfs and network namespace, nothing copied or sent.
    fn floor(&mut self) -> serde_json::Value {
        let images = self.bed.dir.join("floor-images");
        let work = self.bed.dir.join("floor-work");
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
            let out = Command::new(&self.bed.runc_binary)
                .arg("--root")
                .arg(&self.bed.src_runc.root)
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
        args.push(self.id.as_ref());
        runc(&args);
        let checkpoint_ms = t.elapsed().as_millis() as u64;
        let bundle = self.src.bundle.clone();
        let mut args: Vec<&std::ffi::OsStr> = vec!["restore".as_ref(), "-d".as_ref()];
        args.extend(common);
        args.extend(["--bundle".as_ref(), bundle.as_os_str(), self.id.as_ref()]);
        runc(&args);
        let frozen_ms = t.elapsed().as_millis() as u64;
        let du = Command::new("du").args(["-sb"]).arg(&images).output().unwrap();
        let image_bytes: u64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        self.timings.push(("floor: checkpoint + restore", t.elapsed()));
        serde_json::json!({
            "frozen_ms": frozen_ms,
            "frozen_phases": {"checkpoint_ms": checkpoint_ms, "restore_ms": frozen_ms - checkpoint_ms},
            "image_bytes": image_bytes,
        })
    }

    /// Exactly one copy: runc on the source no longer knows the container
    /// and none of its processes is left (its pid namespace is empty); the
    /// destination's runc runs it, in a pid namespace of its own.
    fn assert_exactly_one_copy(&self, src_pidns: u64) -> FixtureContainer {
        assert!(!self.bed.src_runc.exists(&self.id).unwrap(), "the source container is still known to runc");
        assert!(self.bed.src_runc.list().unwrap().is_empty(), "the source runtime still has containers");
        let left = common::wait_for(Duration::from_secs(10), || {
            let p = processes_in(src_pidns);
            p.is_empty().then_some(())
        });
        assert!(left.is_some(), "source processes still alive: {:?}", processes_in(src_pidns));
        let dst = self.bed.dst_container(&self.id);
        let st = self.bed.dst_runc.running(&self.id).unwrap_or_else(|e| panic!("the destination does not run the container: {e}"));
        let dst_ns = pid_namespace(st.pid);
        assert_ne!(dst_ns, src_pidns);
        assert!(!processes_in(dst_ns).is_empty());
        assert!(!dst.bundle.join(".ctmigrate-incomplete").exists(), "the destination bundle is still marked incomplete");
        dst
    }

    /// Deletes the destination's container and checks that nothing of the
    /// migration is left on either host.
    fn finish(self, dst: FixtureContainer, test: &str) {
        let id = self.id.clone();
        drop(dst);
        let left = self.net.leftovers(&id, false);
        assert!(left.is_empty(), "network left behind: {left:#?}");
        std::fs::remove_dir_all(self.bed.dst_bundles().join(&id)).expect("removing the committed bundle");
        common::assert_clean(&self.bed, &id);
        let mut line = format!("TIMING {test}: total {:.1} s", self.started.elapsed().as_secs_f64());
        for (what, d) in &self.timings {
            line += &format!("; {what} {:.1} s", d.as_secs_f64());
        }
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------
// A client on one connection across the migration.
// ---------------------------------------------------------------------------

/// A thread doing one checked request after another on one connection:
/// `step(state, n)` makes request `n` and checks its answer. It hands its
/// state (the connection) back when stopped, for the final checks.
struct Client<S: Send + 'static> {
    name: &'static str,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    max_gap_us: Arc<AtomicU64>,
    stream: TcpStream,
    thread: Option<JoinHandle<Result<S, String>>>,
}

impl<S: Send + 'static> Client<S> {
    fn spawn(
        name: &'static str,
        stream: &TcpStream,
        mut state: S,
        mut step: impl FnMut(&mut S, u64) -> Result<(), String> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let max_gap_us = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, done, max_gap_us) = (stop.clone(), done.clone(), max_gap_us.clone());
            std::thread::spawn(move || -> Result<S, String> {
                let mut n = 0u64;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    step(&mut state, n).map_err(|e| format!("{name}: request {n}: {e}"))?;
                    let gap = last.elapsed().as_micros() as u64;
                    max_gap_us.fetch_max(gap, Ordering::Relaxed);
                    last = Instant::now();
                    n += 1;
                    done.store(n, Ordering::Relaxed);
                }
                Ok(state)
            })
        };
        Client { name, stop, done, max_gap_us, stream: stream.try_clone().unwrap(), thread: Some(thread) }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn fail_if_ended(&mut self, context: &str) {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let outcome = self.thread.take().unwrap().join();
            let why = match outcome {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => "ended".into(),
                Err(_) => "panicked".into(),
            };
            panic!("{context}: the {} client stopped after {} requests: {why}", self.name, self.done());
        }
    }

    /// Waits until `more` requests beyond those done now have succeeded.
    fn assert_progress(&mut self, more: u64, within: Duration, context: &str) {
        let target = self.done() + more;
        let deadline = Instant::now() + within;
        while self.done() < target {
            self.fail_if_ended(context);
            assert!(Instant::now() < deadline, "{context}: the {} client stalled at {} requests", self.name, self.done());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops after the request under way; returns the state, the number
    /// of requests and the longest time between two answers.
    fn stop(mut self) -> (S, u64, Duration) {
        self.fail_if_ended("before stopping");
        self.stop.store(true, Ordering::Relaxed);
        let state = match self.thread.take().unwrap().join() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("{e} (after {} requests)", self.done()),
            Err(_) => panic!("the {} client panicked", self.name),
        };
        let gap = Duration::from_micros(self.max_gap_us.load(Ordering::Relaxed));
        (state, self.done(), gap)
    }
}

impl<S: Send + 'static> Drop for Client<S> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            let _ = t.join();
        }
    }
}

/// A child process killed on drop (a client left running by a failed test).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A deterministic byte stream (xorshift), for files whose digest the test
/// knows.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn write_file(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g)).unwrap();
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL 15 under pgbench.
// ---------------------------------------------------------------------------

const PG_PORT: u16 = 5432;
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PGBENCH_CLIENTS: u32 = 4;
const PGBENCH_TX_PER_CLIENT: u64 = 3750;
/// Transactions per second over all clients (`pgbench -R`): the run takes
/// about 15 000 / 300 = 50 s. The migration starts 3 s in and (moving the
/// 540 MB rootfs too) takes 10-20 s here, so it falls in the middle.
const PGBENCH_RATE: u32 = 300;

/// Runs as the container's init, as user postgres: a data directory of its
/// own (initdb on first start), then PostgreSQL in the foreground.
const PG_START: &str = r#"#!/bin/sh
set -e
D=/var/lib/postgresql/ctm
if [ ! -s "$D/PG_VERSION" ]; then
    /usr/lib/postgresql/15/bin/initdb -D "$D" -U postgres -A trust >/var/lib/postgresql/initdb.log 2>&1
fi
exec /usr/lib/postgresql/15/bin/postgres -D "$D" \
    -c listen_addresses='*' -c unix_socket_directories=/tmp \
    -c hba_file=/etc/ctm/pg_hba.conf 2>>/var/lib/postgresql/postgres.log
"#;

const PG_HBA: &str = "local all all trust\nhost all all 0.0.0.0/0 trust\n";

impl ServiceBed {
    /// psql in the client namespace: the rows of `sql`'s answer.
    fn psql(&mut self, sql: &str) -> Result<String, String> {
        let ip = self.net.container_ip.to_string();
        let out = self
            .client_command(&format!("{PG_BIN}/psql"))
            .args(["-h", &ip, "-p", &PG_PORT.to_string(), "-U", "postgres", "-d", "postgres", "-tAX", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn pg_log(&self, rootfs: &Path) -> String {
        let log = std::fs::read_to_string(rootfs.join("var/lib/postgresql/postgres.log")).unwrap_or_default();
        let init = std::fs::read_to_string(rootfs.join("var/lib/postgresql/initdb.log")).unwrap_or_default();
        format!("initdb.log:\n{init}\npostgres.log:\n{log}")
    }
}

fn pgbench_line<'a>(output: &'a str, prefix: &str) -> Option<&'a str> {
    output.lines().find_map(|l| l.trim().strip_prefix(prefix)).map(str::trim)
}

/// A PostgreSQL container, answering, with pgbench's tables (scale 10: a
/// million accounts); also returns postgres's uid and the source's pid
/// namespace.
fn postgres_bed(prefix: &str) -> Option<(ServiceBed, u32, u64)> {
    let spec = ServiceSpec { args: vec!["/bin/sh".into(), "/ctm/start-postgres.sh".into()], user: Some("postgres"), cwd: "/var/lib/postgresql" };
    let mut sb = service_bed(prefix, "postgres", spec, |rootfs| {
        write_file(&rootfs.join("ctm/start-postgres.sh"), PG_START.as_bytes(), 0o755, None);
        write_file(&rootfs.join("etc/ctm/pg_hba.conf"), PG_HBA.as_bytes(), 0o644, None);
    })?;
    let rootfs = sb.rootfs();
    let t = Instant::now();
    let ready = common::wait_for(Duration::from_secs(90), || sb.psql("SELECT 1").ok().filter(|r| r == "1"));
    assert!(ready.is_some(), "PostgreSQL did not answer within 90 s: {}\n{}", sb.service_log_hint(), sb.pg_log(&rootfs));
    sb.timings.push(("PostgreSQL start (initdb included)", t.elapsed()));

    // PostgreSQL runs as postgres: every process of the container.
    let (pg_uid, _) = debian::user_ids(&rootfs, "postgres").unwrap();
    let src_pidns = pid_namespace(sb.source_pid());
    let procs = processes_in(src_pidns);
    assert!(procs.len() >= 4 && procs.iter().all(|p| p.uid == pg_uid), "not all PostgreSQL processes run as postgres: {procs:?}");

    let ip = sb.net.container_ip.to_string();
    let t = Instant::now();
    let init = sb
        .client_command(&format!("{PG_BIN}/pgbench"))
        .args(["-h", &ip, "-p", &PG_PORT.to_string(), "-U", "postgres", "-i", "-s", "10", "postgres"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    sb.timings.push(("pgbench -i -s 10", t.elapsed()));
    assert_eq!(sb.psql("SELECT count(*) FROM pgbench_history").unwrap(), "0");
    Some((sb, pg_uid, src_pidns))
}

/// A pgbench run from the client namespace: 4 clients, a fixed number of
/// transactions each, at a fixed total rate so that it is still running
/// when a migration completes. Killed if dropped before it ends.
struct Pgbench {
    child: KillOnDrop,
    out: PathBuf,
    err: PathBuf,
    started: Instant,
    /// Where `-l` writes its per-transaction logs (host path), if asked.
    log_dir: Option<PathBuf>,
}

struct PgbenchOutcome {
    stdout: String,
    stderr: String,
    status: std::process::ExitStatus,
}

impl Pgbench {
    /// `log`: also write a per-transaction log (for the client's longest
    /// gap), in the client root's tmpfs.
    fn start(sb: &mut ServiceBed, log: bool) -> Self {
        let ip = sb.net.container_ip.to_string();
        let out = sb.bed.dir.join("pgbench.out");
        let err = sb.bed.dir.join("pgbench.err");
        let root = sb.client_root();
        let mut cmd = sb.client_command(&format!("{PG_BIN}/pgbench"));
        cmd.args(["-h", &ip, "-p", &PG_PORT.to_string(), "-U", "postgres"])
            .args(["-c", &PGBENCH_CLIENTS.to_string(), "-j", "2", "-t", &PGBENCH_TX_PER_CLIENT.to_string()])
            .args(["-R", &PGBENCH_RATE.to_string(), "-P", "1"]);
        if log {
            cmd.args(["-l", "--log-prefix=/tmp/pgbench_log"]);
        }
        let child = cmd
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Pgbench { child: KillOnDrop(child), out, err, started: Instant::now(), log_dir: log.then(|| root.join("tmp")) }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.0.try_wait().unwrap().is_none()
    }

    /// Waits for `seconds` progress reports.
    fn wait_progress(&mut self, seconds: usize) {
        let progress = |p: &Self| p.stderr().lines().filter(|l| l.starts_with("progress:")).count();
        let ok = common::wait_for(Duration::from_secs(60), || (progress(self) >= seconds).then_some(()));
        assert!(ok.is_some() && self.running(), "pgbench did not get going: {}", self.stderr());
    }

    fn wait(mut self, within: Duration) -> PgbenchOutcome {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "pgbench did not finish within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        PgbenchOutcome { stdout: std::fs::read_to_string(&self.out).unwrap(), stderr: self.stderr(), status }
    }

    /// The longest time between two transactions' completions, from the
    /// `-l` logs (`client transaction latency script epoch_s epoch_us
    /// [lag]`, one file per thread).
    fn longest_gap(log_dir: &Path) -> Duration {
        let mut done: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(log_dir).unwrap().flatten() {
            if !e.file_name().to_string_lossy().starts_with("pgbench_log") {
                continue;
            }
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                let f: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                if f.len() >= 6 {
                    done.push(f[4] * 1_000_000 + f[5]);
                }
            }
        }
        done.sort_unstable();
        Duration::from_micros(done.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
    }
}

impl PgbenchOutcome {
    /// Every transaction committed: exit 0, none failed or aborted, all
    /// processed. Returns how many.
    fn assert_all_committed(&self) -> u64 {
        let (stdout, stderr) = (&self.stdout, &self.stderr);
        assert!(self.status.success(), "pgbench failed ({}):\n{stdout}\n{stderr}", self.status);
        assert!(!stderr.contains("aborted") && !stdout.contains("aborted"), "a pgbench client aborted:\n{stdout}\n{stderr}");
        let total = PGBENCH_CLIENTS as u64 * PGBENCH_TX_PER_CLIENT;
        let processed = pgbench_line(stdout, "number of transactions actually processed:").unwrap_or_else(|| panic!("no count in:\n{stdout}"));
        assert_eq!(processed, format!("{total}/{total}"), "transactions processed:\n{stdout}");
        let failed = pgbench_line(stdout, "number of failed transactions:").unwrap_or_else(|| panic!("no failure count in:\n{stdout}"));
        assert!(failed.starts_with("0 "), "failed transactions: {failed}");
        total
    }
}

#[test]
fn workload_postgres_pgbench_commits_every_transaction_across_migration() {
    let Some((mut sb, pg_uid, src_pidns)) = postgres_bed("wpg") else { return };
    let mut pgbench = Pgbench::start(&mut sb, false);
    pgbench.wait_progress(3);

    sb.migrate();
    let migrated_after = pgbench.started.elapsed();
    // Mid-run: pgbench was still running when the migration completed.
    assert!(
        pgbench.running(),
        "pgbench finished before the migration did ({migrated_after:?}): raise PGBENCH_TX_PER_CLIENT\n{}",
        pgbench.stderr()
    );
    let started = pgbench.started;
    let outcome = pgbench.wait(Duration::from_secs(300));
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
    let total = outcome.assert_all_committed();

    // Every committed transaction wrote one history row; the balances
    // agree with the history.
    let rows: u64 = sb.psql("SELECT count(*) FROM pgbench_history").unwrap().parse().unwrap();
    assert_eq!(rows, total, "pgbench committed {total} transactions; pgbench_history holds {rows} rows");
    let sums = sb
        .psql(
            "SELECT (SELECT coalesce(sum(delta),0) FROM pgbench_history) || ' ' || (SELECT sum(abalance) FROM pgbench_accounts) \
             || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || (SELECT sum(bbalance) FROM pgbench_branches)",
        )
        .unwrap();
    let sums: Vec<&str> = sums.split_whitespace().collect();
    assert!(sums.len() == 4 && sums.iter().all(|s| *s == sums[0]), "balances disagree with the history (history, accounts, tellers, branches): {sums:?}");
    assert_eq!(sb.psql("SELECT count(*) FROM pgbench_accounts").unwrap(), "1000000");

    let dst = sb.assert_exactly_one_copy(src_pidns);
    let dst_procs = processes_in(pid_namespace(sb.bed.dst_runc.running(&sb.id).unwrap().pid));
    assert!(dst_procs.iter().all(|p| p.uid == pg_uid), "destination processes not all postgres: {dst_procs:?}");
    sb.finish(dst, "workload_postgres");
}

// ---------------------------------------------------------------------------
// Redis with a million keys, one client doing SET/GET.
// ---------------------------------------------------------------------------

const REDIS_PORT: u16 = 6379;
const POPULATED: u64 = 1_000_000;

#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// A RESP2 client on one connection.
struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Resp {
    fn new(stream: &TcpStream) -> Self {
        Resp { r: BufReader::with_capacity(1 << 16, stream.try_clone().unwrap()), w: stream.try_clone().unwrap() }
    }

    fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&buf).map_err(|e| format!("sending: {e}"))
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) if l.ends_with("\r\n") => Ok(l.trim_end_matches("\r\n").to_string()),
            Ok(_) => Err(format!("truncated line {l:?}")),
            Err(e) => Err(format!("reading: {e}")),
        }
    }

    fn reply(&mut self) -> Result<Reply, String> {
        let l = self.line()?;
        let (kind, rest) = l.split_at(1.min(l.len()));
        let num = || rest.parse::<i64>().map_err(|_| format!("bad reply {l:?}"));
        Ok(match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(num()?),
            "$" => {
                let n = num()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut v = vec![0; n as usize + 2];
                    self.r.read_exact(&mut v).map_err(|e| format!("reading a bulk string: {e}"))?;
                    if !v.ends_with(b"\r\n") {
                        return Err("a bulk string without its CRLF".into());
                    }
                    v.truncate(n as usize);
                    Reply::Bulk(Some(v))
                }
            }
            "*" => {
                let n = num()?;
                if n < 0 {
                    Reply::Array(None)
                } else {
                    Reply::Array(Some((0..n).map(|_| self.reply()).collect::<Result<_, _>>()?))
                }
            }
            _ => return Err(format!("bad reply {l:?}")),
        })
    }

    fn cmd(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.send(args)?;
        self.reply()
    }

    fn expect(&mut self, args: &[&[u8]], want: Reply) -> Result<(), String> {
        let got = self.cmd(args)?;
        if got != want {
            let shown: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            return Err(format!("{shown:?} answered {got:?}, expected {want:?}"));
        }
        Ok(())
    }

    /// `INFO server`'s run_id: random per redis-server start.
    fn run_id(&mut self) -> Result<String, String> {
        match self.cmd(&[b"INFO", b"server"])? {
            Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text)
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|s| s.trim().to_string())
                .ok_or_else(|| "INFO without run_id".into()),
            other => Err(format!("INFO answered {other:?}")),
        }
    }
}

/// The value the client stores under `ctm:<n>`: different lengths, and
/// distinct per run.
fn redis_value(token: &str, n: u64) -> Vec<u8> {
    let mut v = format!("{token}:{n}:").into_bytes();
    v.extend(std::iter::repeat(b'a' + (n % 26) as u8).take((n % 200) as usize));
    v
}

/// A Redis container (as user redis) holding a million keys (key:N =
/// value:N), with one connection to it; also returns redis's uid and the
/// source's pid namespace.
fn redis_bed(prefix: &str) -> Option<(ServiceBed, TcpStream, Resp, u32, u64)> {
    let args = [
        "/usr/bin/redis-server",
        "--bind",
        "0.0.0.0",
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--enable-debug-command",
        "yes",
        "--dir",
        "/var/lib/redis",
        "--logfile",
        "/var/log/redis/redis-server.log",
    ];
    let spec = ServiceSpec { args: args.map(String::from).to_vec(), user: Some("redis"), cwd: "/var/lib/redis" };
    let mut sb = service_bed(prefix, "redis", spec, |_| {})?;
    let t = Instant::now();
    let stream = sb.connect(REDIS_PORT, Duration::from_secs(30));
    let mut conn = Resp::new(&stream);
    common::wait_for(Duration::from_secs(30), || conn.cmd(&[b"PING"]).ok().filter(|r| *r == Reply::Simple("PONG".into())))
        .expect("redis never answered PING");
    sb.timings.push(("Redis start", t.elapsed()));
    let (redis_uid, _) = debian::user_ids(&sb.rootfs(), "redis").unwrap();
    let src_pidns = pid_namespace(sb.source_pid());
    let procs = processes_in(src_pidns);
    assert!(!procs.is_empty() && procs.iter().all(|p| p.uid == redis_uid), "redis does not run as redis: {procs:?}");

    let t = Instant::now();
    conn.expect(&[b"DEBUG", b"POPULATE", POPULATED.to_string().as_bytes()], Reply::Simple("OK".into())).unwrap();
    conn.expect(&[b"DBSIZE"], Reply::Int(POPULATED as i64)).unwrap();
    sb.timings.push(("DEBUG POPULATE 1000000", t.elapsed()));
    Some((sb, stream, conn, redis_uid, src_pidns))
}

/// The client: SET ctm:n, GET it back, GET one of the populated keys;
/// every answer checked.
fn redis_client(stream: &TcpStream, conn: Resp, token: &str) -> Client<Resp> {
    let token = token.to_string();
    Client::spawn("redis", stream, conn, move |c: &mut Resp, n| {
        let key = format!("ctm:{n}");
        let value = redis_value(&token, n);
        c.expect(&[b"SET", key.as_bytes(), &value], Reply::Simple("OK".into()))?;
        c.expect(&[b"GET", key.as_bytes()], Reply::Bulk(Some(value)))?;
        let k = (n * 7919) % POPULATED;
        c.expect(&[b"GET", format!("key:{k}").as_bytes()], Reply::Bulk(Some(format!("value:{k}").into_bytes())))
    })
}

fn run_token() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("{:x}-{}", now.as_nanos(), std::process::id())
}

#[test]
fn workload_redis_million_keys_one_connection_every_value_checked() {
    let Some((mut sb, stream, mut conn, redis_uid, src_pidns)) = redis_bed("wrd") else { return };
    let run_id = conn.run_id().unwrap();
    let token = run_token();
    let mut client = redis_client(&stream, conn, &token);
    client.assert_progress(2_000, Duration::from_secs(60), "before migrating");

    sb.migrate();
    client.assert_progress(5_000, Duration::from_secs(120), "after migrating");
    let (mut conn, steps, gap) = client.stop();
    eprintln!("redis client: {steps} SET/GET rounds on one connection, longest gap {gap:?}");

    // Same server process (not restarted), every key there, every value
    // right: the client's and the million populated ones.
    assert_eq!(conn.run_id().unwrap(), run_id, "redis was restarted");
    conn.expect(&[b"DBSIZE"], Reply::Int((POPULATED + steps) as i64)).unwrap();
    let check = |conn: &mut Resp, keys: Vec<String>, values: Vec<Vec<u8>>| {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        let want = Reply::Array(Some(values.into_iter().map(|v| Reply::Bulk(Some(v))).collect()));
        let got = conn.cmd(&args).unwrap();
        if got != want {
            panic!("MGET {}..{}: values differ", keys[0], keys[keys.len() - 1]);
        }
    };
    for start in (0..steps).step_by(1000) {
        let range = start..(start + 1000).min(steps);
        check(&mut conn, range.clone().map(|n| format!("ctm:{n}")).collect(), range.map(|n| redis_value(&token, n)).collect());
    }
    for start in (0..POPULATED).step_by(5000) {
        let range = start..(start + 5000).min(POPULATED);
        check(&mut conn, range.clone().map(|n| format!("key:{n}")).collect(), range.map(|n| format!("value:{n}").into_bytes()).collect());
    }
    drop(conn);

    let dst = sb.assert_exactly_one_copy(src_pidns);
    let dst_procs = processes_in(pid_namespace(sb.bed.dst_runc.running(&sb.id).unwrap().pid));
    assert!(dst_procs.iter().all(|p| p.uid == redis_uid), "destination redis not running as redis: {dst_procs:?}");
    sb.finish(dst, "workload_redis");
}

// ---------------------------------------------------------------------------
// nginx with www-data workers, a keep-alive client checking each body.
// ---------------------------------------------------------------------------

const HTTP_PORT: u16 = 80;
const BLOB_LEN: usize = 4 << 20;

const NGINX_CONF: &str = r#"user www-data;
worker_processes 2;
daemon off;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    # One connection carries the whole test: nginx's default closes it
    # after 1000 requests.
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    server {
        listen 80;
        root /srv/www;
        location / { }
    }
}
"#;

/// One HTTP/1.1 GET on a keep-alive connection: the body, checked to be
/// complete and the connection to stay open.
fn http_get(r: &mut BufReader<TcpStream>, w: &mut TcpStream, path: &str) -> Result<Vec<u8>, String> {
    write!(w, "GET {path} HTTP/1.1\r\nHost: ctmigrate\r\nConnection: keep-alive\r\n\r\n").map_err(|e| format!("sending: {e}"))?;
    let mut status = String::new();
    match r.read_line(&mut status) {
        Ok(0) => return Err("the server closed the connection".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("reading the status line: {e}")),
    }
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(format!("status {:?}", status.trim()));
    }
    let mut length = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| format!("reading headers: {e}"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').ok_or_else(|| format!("bad header {h:?}"))?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse::<usize>().ok(),
            "connection" if value.trim().eq_ignore_ascii_case("close") => return Err("the server is closing the connection".into()),
            _ => {}
        }
    }
    let length = length.ok_or("no Content-Length")?;
    let mut body = vec![0; length];
    r.read_exact(&mut body).map_err(|e| format!("reading {length} body bytes: {e}"))?;
    Ok(body)
}

/// The master runs as root, its two workers as `www_uid`.
fn nginx_workers_ok(procs: &[Proc], master: i32, www_uid: u32) -> bool {
    let (masters, workers): (Vec<&Proc>, Vec<&Proc>) = procs.iter().partition(|p| p.pid == master);
    masters.len() == 1
        && masters[0].uid == 0
        && workers.len() == 2
        && procs.iter().all(|p| p.name == "nginx")
        && workers.iter().all(|p| p.uid == www_uid)
}

/// An nginx container serving a 4 MiB file, with one connection to it;
/// also returns the file's SHA-256, www-data's uid and the source's pid
/// namespace.
fn nginx_bed(prefix: &str) -> Option<(ServiceBed, TcpStream, String, u32, u64)> {
    let blob = pseudo_random(BLOB_LEN, 0x5eed_0016);
    let digest = sha256_hex(&blob);
    let spec = ServiceSpec { args: vec!["/usr/sbin/nginx".into(), "-c".into(), "/etc/nginx/ctm.conf".into()], user: None, cwd: "/" };
    let mut sb = service_bed(prefix, "nginx", spec, |rootfs| {
        write_file(&rootfs.join("etc/nginx/ctm.conf"), NGINX_CONF.as_bytes(), 0o644, None);
        write_file(&rootfs.join("srv/www/blob.bin"), &blob, 0o644, None);
    })?;
    let t = Instant::now();
    let stream = sb.connect(HTTP_PORT, Duration::from_secs(30));
    sb.timings.push(("nginx start", t.elapsed()));
    let (www_uid, _) = debian::user_ids(&sb.rootfs(), "www-data").unwrap();
    let src_pid = sb.source_pid();
    let src_pidns = pid_namespace(src_pid);
    let procs = common::wait_for(Duration::from_secs(10), || Some(processes_in(src_pidns)).filter(|p| nginx_workers_ok(p, src_pid, www_uid)));
    assert!(procs.is_some(), "expected an nginx master as root and two www-data workers: {:?}", processes_in(src_pidns));
    Some((sb, stream, digest, www_uid, src_pidns))
}

/// The client: GET /blob.bin again and again on the keep-alive
/// connection, each body's length and SHA-256 checked.
fn http_client(stream: &TcpStream, digest: &str) -> Client<()> {
    let (mut r, mut w) = (BufReader::with_capacity(1 << 16, stream.try_clone().unwrap()), stream.try_clone().unwrap());
    let digest = digest.to_string();
    Client::spawn("http", stream, (), move |_, _| {
        let body = http_get(&mut r, &mut w, "/blob.bin")?;
        if body.len() != BLOB_LEN || sha256_hex(&body) != digest {
            return Err(format!("body of {} bytes with digest {}, expected {BLOB_LEN} bytes with {digest}", body.len(), sha256_hex(&body)));
        }
        Ok(())
    })
}

#[test]
fn workload_nginx_keepalive_downloads_arrive_intact() {
    let Some((mut sb, stream, digest, www_uid, src_pidns)) = nginx_bed("wng") else { return };
    let mut client = http_client(&stream, &digest);
    client.assert_progress(20, Duration::from_secs(60), "before migrating");

    sb.migrate();
    client.assert_progress(50, Duration::from_secs(120), "after migrating");
    let (_, downloads, gap) = client.stop();
    eprintln!("http client: {downloads} downloads of {BLOB_LEN} bytes on one connection, each digest checked; longest gap {gap:?}");
    drop(stream);

    let dst = sb.assert_exactly_one_copy(src_pidns);
    let dst_pid = sb.bed.dst_runc.running(&sb.id).unwrap().pid;
    let dst_procs = processes_in(pid_namespace(dst_pid));
    assert!(nginx_workers_ok(&dst_procs, dst_pid, www_uid), "destination: expected an nginx master as root and two www-data workers: {dst_procs:?}");
    let served = std::fs::read(dst.rootfs().join("srv/www/blob.bin")).unwrap();
    assert_eq!(sha256_hex(&served), digest, "the served file changed on the destination");
    sb.finish(dst, "workload_nginx");
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
    let rc = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setting {name} on {}: {}", path.display(), std::io::Error::last_os_error());
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
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
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
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
    let flock_held = if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
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
    let stream = sb.connect(LOCK_PORT, Duration::from_secs(30));
    sb.timings.push(("lock holder start", t.elapsed()));

    // On the source: the tree as made, the locks held by the holder (the
    // container's init), proven by the probes the destination gets.
    let src_pid = sb.source_pid();
    let src_pidns = pid_namespace(src_pid);
    assert_tree(&src_rootfs, "source");
    assert_locks_held(&src_rootfs, src_pid, "source");

    let client = {
        let (mut r, mut w) = (BufReader::new(stream.try_clone().unwrap()), stream.try_clone().unwrap());
        let token = token.clone();
        Client::spawn("ping", &stream, (), move |_, n| {
            writeln!(w, "PING {n}").map_err(|e| format!("sending: {e}"))?;
            let mut l = String::new();
            r.read_line(&mut l).map_err(|e| format!("reading: {e}"))?;
            let want = format!("PONG {n} {token}\n");
            if l != want {
                return Err(format!("answered {l:?}, expected {want:?} (a restarted holder draws a new token)"));
            }
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        })
    };
    let mut client = client;
    client.assert_progress(200, Duration::from_secs(30), "before migrating");

    sb.migrate();
    client.assert_progress(500, Duration::from_secs(120), "after migrating");
    let (_, pings, gap) = client.stop();
    eprintln!("lock holder client: {pings} pings on one connection, longest gap {gap:?}");

    let dst = sb.assert_exactly_one_copy(src_pidns);
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

    sb.finish(dst, "workload_locks");
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
        MoveBy::Ctmigrate => sb.migrate(),
        MoveBy::Floor => sb.floor(),
    };
    let (result, gap, timings) = match service {
        Service::Postgres => {
            let (mut sb, _, _) = postgres_bed("bpg")?;
            let mut pgbench = Pgbench::start(&mut sb, true);
            pgbench.wait_progress(3);
            let result = mv(&mut sb);
            assert!(pgbench.running(), "pgbench finished before the move did");
            let log_dir = pgbench.log_dir.clone().unwrap();
            pgbench.wait(Duration::from_secs(300)).assert_all_committed();
            (result, Pgbench::longest_gap(&log_dir), sb.timings.clone())
        }
        Service::Redis => {
            let (mut sb, stream, conn, _, _) = redis_bed("brd")?;
            let mut client = redis_client(&stream, conn, &run_token());
            client.assert_progress(2_000, Duration::from_secs(60), "before the move");
            let result = mv(&mut sb);
            client.assert_progress(2_000, Duration::from_secs(120), "after the move");
            let (_, _, gap) = client.stop();
            (result, gap, sb.timings.clone())
        }
        Service::Nginx => {
            let (mut sb, stream, digest, _, _) = nginx_bed("bng")?;
            let mut client = http_client(&stream, &digest);
            client.assert_progress(20, Duration::from_secs(60), "before the move");
            let result = mv(&mut sb);
            client.assert_progress(20, Duration::from_secs(120), "after the move");
            let (_, _, gap) = client.stop();
            (result, gap, sb.timings.clone())
        }
    };
    let mut sample = serde_json::json!({
        "service": format!("{service:?}").to_lowercase(),
        "method": format!("{how:?}").to_lowercase(),
        "client_gap_ms": gap.as_millis() as u64,
        "timings_s": timings.iter().map(|(w, d)| (w.to_string(), serde_json::json!(d.as_secs_f64()))).collect::<serde_json::Map<_, _>>(),
    });
    for field in ["frozen_ms", "frozen_phases", "bytes_sent", "total_ms", "image_bytes", "rootfs_verified"] {
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
    let mut samples = Vec::new();
    for service in [Service::Postgres, Service::Redis, Service::Nginx] {
        if !wanted("CTMIGRATE_BENCH_WORKLOADS", &format!("{service:?}").to_lowercase()) {
            continue;
        }
        for how in [MoveBy::Ctmigrate, MoveBy::Floor] {
            if !wanted("CTMIGRATE_BENCH_METHODS", &format!("{how:?}").to_lowercase()) {
                continue;
            }
            let Some(sample) = bench_one(service, how) else { return };
            eprintln!("BENCH {sample}");
            samples.push(sample);
        }
    }
    let mut table = String::from("| service | method | frozen ms | client's longest gap ms | sent MB | images MB | phases |\n|---|---|---:|---:|---:|---:|---|\n");
    let mb = |v: &serde_json::Value| v.as_u64().map(|b| format!("{:.1}", b as f64 / 1e6)).unwrap_or_else(|| "-".into());
    for s in &samples {
        table += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            s["service"].as_str().unwrap(),
            s["method"].as_str().unwrap(),
            s["frozen_ms"],
            s["client_gap_ms"],
            mb(&s["bytes_sent"]),
            mb(&s["image_bytes"]),
            s["frozen_phases"]
        );
    }
    for service in ["postgres", "redis", "nginx"] {
        let frozen = |m: &str| samples.iter().find(|s| s["service"] == service && s["method"] == m).and_then(|s| s["frozen_ms"].as_u64());
        if let (Some(c), Some(f)) = (frozen("ctmigrate"), frozen("floor")) {
            table += &format!("\n{service}: ctmigrate's frozen time is {:.2} times the floor's", c as f64 / f.max(1) as f64);
        }
    }
    eprintln!("\n{table}\n");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("workloads-bench.json"), serde_json::to_vec_pretty(&samples).unwrap()).unwrap();
}
