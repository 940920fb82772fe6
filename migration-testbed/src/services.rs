//! A real service in a Debian rootfs on the two-host testbed, and a client
//! that holds one connection to it across a migration, checking every
//! answer. Used by `ctmigrate validate --workload` and tests/workloads.rs.
//!
//! The bed: a [`Testbed`], the three-namespace [`ContainerNetwork`] (the
//! service's container in the source's named namespace, wired to its
//! bridge; the client in a namespace of its own with a route to either
//! host), a copy of the cached Debian rootfs in the source's bundle and the
//! service running in it. [`ServiceBed::migrate`] moves it with
//! `--tcp-established` and this very binary on both sides;
//! [`ServiceBed::exactly_one_copy`] and [`ServiceBed::finish`] check what
//! is left. Everything is removed on drop, also on failure.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::debian::{self, ReadOnlyRoot};
use super::{connect_from, join_network_namespace, wait_for, ChildProcess, ContainerNetwork, FixtureContainer, HostPair, Side, Testbed};
use migration_engine::MigrationError;

/// What the container runs, as its config.json says.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub args: Vec<String>,
    /// A user of the rootfs's /etc/passwd; None: root.
    pub user: Option<&'static str>,
    pub cwd: &'static str,
}

/// Docker's default capability set: what a service's root master process
/// (nginx's) needs to switch its workers to another user.
pub const DEFAULT_CAPS: &[&str] = &[
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

/// One service bed at a time in a process: each copies a 540 MB rootfs
/// and moves a service of up to a few hundred MiB.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A testbed with the three-namespace network and a service container in
/// the source's named namespace. Fields drop in order: the container, the
/// client root, the network, the hosts.
pub struct ServiceBed {
    pub src: FixtureContainer,
    pub client_root: Option<ReadOnlyRoot>,
    pub net: ContainerNetwork,
    pub bed: Testbed,
    pub id: String,
    /// The cached rootfs the bundle was copied from.
    pub cache: PathBuf,
    pub started: Instant,
    /// How long each step took, for reports.
    pub timings: Vec<(&'static str, Duration)>,
    /// The source container's pid namespace, held open so that its inode
    /// number (how [`Self::exactly_one_copy`] finds the source's
    /// processes) is not given to another namespace once the source is
    /// gone.
    _src_pidns: std::fs::File,
    /// Held until the bed is gone: one service bed at a time, even when a
    /// test harness runs tests in parallel.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// What a finished bed took, step by step.
#[derive(Debug, Clone)]
pub struct Timings {
    pub total: Duration,
    pub steps: Vec<(&'static str, Duration)>,
}

impl Timings {
    /// `TIMING <what>: total 61.2 s; rootfs copy (cp -a) 5.1 s; ...`
    pub fn line(&self, what: &str) -> String {
        let mut line = format!("TIMING {what}: total {:.1} s", self.total.as_secs_f64());
        for (step, d) in &self.steps {
            line += &format!("; {step} {:.1} s", d.as_secs_f64());
        }
        line
    }
}

/// A migration [`ServiceBed::migrate`] made: both sides' result events.
#[derive(Debug, Clone)]
pub struct Migrated {
    pub sender: serde_json::Value,
    pub receiver: serde_json::Value,
    /// The receiver's phase events (`phase`, `elapsed_ms`), for benchmarks.
    pub receiver_phases: Vec<serde_json::Value>,
    /// From the receiver's start to the sender's exit.
    pub took: Duration,
}

/// A process as /proc shows it from the host.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub uid: u32,
    pub name: String,
}

/// The inode of `pid`'s pid namespace.
pub fn pid_namespace(pid: i32) -> Result<u64, MigrationError> {
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/pid")).map_err(MigrationError::io(format!("pid namespace of {pid}")))?.ino())
}

/// Every process of the host in the pid namespace `ns`.
pub fn processes_in(ns: u64) -> Vec<Proc> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten()
        .filter(|p| std::fs::metadata(format!("/proc/{}/ns/pid", p.pid)).map(|m| m.ino()).ok() == Some(ns))
        .filter_map(|p| p.status().ok().map(|status| Proc { pid: p.pid, uid: status.ruid, name: status.name }))
        .collect()
}

fn json_error(e: serde_json::Error) -> MigrationError {
    MigrationError::Other(format!("config.json: {e}"))
}

/// Writes the bundle's config.json for `spec`: runc's default spec with
/// the service's command, user, working directory and Docker's default
/// capabilities.
fn write_config(runc_binary: &Path, bundle: &Path, spec: &ServiceSpec) -> Result<(), MigrationError> {
    let _ = std::fs::remove_file(bundle.join("config.json"));
    let out = Command::new(runc_binary).arg("spec").arg("--bundle").arg(bundle).output().map_err(MigrationError::io("running runc spec"))?;
    if !out.status.success() {
        return Err(MigrationError::Other(format!("runc spec: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let path = bundle.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).map_err(MigrationError::io("reading config.json"))?).map_err(json_error)?;
    let p = &mut cfg["process"];
    p["terminal"] = false.into();
    p["args"] = spec.args.clone().into();
    p["cwd"] = spec.cwd.into();
    let mut home = "HOME=/root".to_string();
    if let Some(user) = spec.user {
        let rootfs = bundle.join("rootfs");
        let (uid, gid) = debian::user_ids(&rootfs, user)?;
        p["user"] = serde_json::json!({"uid": uid, "gid": gid});
        home = format!("HOME={}", debian::user_home(&rootfs, user)?);
    }
    p["env"] = serde_json::json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", home]);
    for set in ["bounding", "effective", "permitted"] {
        p["capabilities"][set] = DEFAULT_CAPS.into();
    }
    cfg["root"]["readonly"] = false.into();
    cfg["hostname"] = "ctmigrate-workload".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).map_err(json_error)?).map_err(MigrationError::io("writing config.json"))
}

impl ServiceBed {
    /// Builds the bed on `bed`: the cached Debian rootfs (built first if
    /// missing; `note` hears about that), the network, a copy of the rootfs
    /// in a source bundle to which `prepare` adds the service's files, and
    /// the service started. `name` names the container (`<name>-<tag>`).
    pub fn create(
        bed: Testbed,
        name: &str,
        spec: &ServiceSpec,
        prepare: impl FnOnce(&Path) -> Result<(), MigrationError>,
        note: &dyn Fn(&str),
    ) -> Result<Self, MigrationError> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        if let Some(why) = debian::missing_tool() {
            return Err(MigrationError::Preflight(why));
        }
        let mut timings = Vec::new();
        let (cache, built) = debian::SERVICES.get(note)?;
        let t = Instant::now();
        if built > Duration::ZERO {
            timings.push(("rootfs build (mmdebstrap)", built));
        }
        let net = ContainerNetwork::create(&bed)?;
        // Ids are unique per bed: runc puts a container without a cgroups
        // path in the cgroup named by its id.
        let id = format!("{name}-{}", bed.tag);
        let bundle = bed.dir.join("src-bundles").join(&id);
        std::fs::create_dir_all(&bundle).map_err(MigrationError::io(format!("creating {}", bundle.display())))?;
        let rootfs = bundle.join("rootfs");
        let copied = debian::copy_rootfs(&cache, &rootfs)?;
        timings.push(("rootfs copy (cp -a)", copied));
        prepare(&rootfs)?;
        write_config(&bed.runc_binary, &bundle, spec)?;
        join_network_namespace(&bundle, &net.container_netns_path())?;
        let src = FixtureContainer::start(bed.src_runc.clone(), &id, &bundle)
            .map_err(|e| MigrationError::Other(format!("starting {id}: {e}")))?;
        let pid = bed.src_runc.running(&id).map_err(|e| MigrationError::Other(format!("{id} did not start: {e}")))?.pid;
        let src_pidns = std::fs::File::open(format!("/proc/{pid}/ns/pid")).map_err(MigrationError::io(format!("opening {id}'s pid namespace")))?;
        timings.push(("bundle and container start", t.elapsed().saturating_sub(copied)));
        Ok(ServiceBed { src, client_root: None, net, bed, id, cache, started, timings, _src_pidns: src_pidns, _serial: serial })
    }

    pub fn rootfs(&self) -> PathBuf {
        self.src.rootfs()
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.net.container_ip, port))
    }

    /// One connection from the client namespace, retried until the
    /// service listens.
    pub fn connect(&self, port: u16, within: Duration) -> Result<TcpStream, MigrationError> {
        let addr = self.addr(port);
        let stream = wait_for(within, || connect_from(&self.net.client, addr).ok()).ok_or_else(|| {
            MigrationError::Other(format!("nothing answered at {addr} within {within:?}; {}", self.service_log_hint()))
        })?;
        let set = |r: std::io::Result<()>| r.map_err(MigrationError::io(format!("setting up the connection to {addr}")));
        set(stream.set_nodelay(true))?;
        set(stream.set_read_timeout(Some(Duration::from_secs(120))))?;
        set(stream.set_write_timeout(Some(Duration::from_secs(120))))?;
        Ok(stream)
    }

    /// What runc says of the source container, for error messages.
    pub fn service_log_hint(&self) -> String {
        match self.bed.src_runc.state(&self.id) {
            Ok(s) => format!("the container is {}", s.status),
            Err(e) => format!("the container: {e}"),
        }
    }

    /// The cached rootfs, read-only at a path of this bed's own, for
    /// clients run from it with chroot.
    pub fn client_root(&mut self) -> Result<PathBuf, MigrationError> {
        if let Some(root) = &self.client_root {
            return Ok(root.path.clone());
        }
        let at = self.bed.dir.join("client-root");
        let root = ReadOnlyRoot::mount(&self.cache, &at)?;
        let path = root.path.clone();
        self.client_root = Some(root);
        Ok(path)
    }

    /// `program` (a path inside the Debian rootfs) run by chroot into the
    /// read-only client root, in the client's network namespace.
    pub fn client_command(&mut self, program: &str) -> Result<Command, MigrationError> {
        let root = self.client_root()?;
        let mut c = HostPair::command_in(&self.net.client, "chroot");
        c.arg(root).arg(program);
        c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("LANG", "C.UTF-8").env("HOME", "/nonexistent");
        Ok(c)
    }

    /// The source container's init pid.
    pub fn source_pid(&self) -> Result<i32, MigrationError> {
        Ok(self.bed.src_runc.running(&self.id).map_err(|e| MigrationError::Other(format!("the source container: {e}")))?.pid)
    }

    /// Migrates the container with `--tcp-established` to the destination
    /// (a receiver on `port`), whose receiver rebuilds its network on the
    /// destination's bridge, and points the client's route there. Fails,
    /// with the sender's and the receiver's messages, unless both sides
    /// succeeded and the destination proved its rootfs the source's; after
    /// a failed migration the route points at the source again.
    pub fn migrate(&mut self, port: u16) -> Result<Migrated, MigrationError> {
        let t = Instant::now();
        let mut receiver = self.bed.spawn_receiver(port, &["--once", "--bridge", &self.net.bridge], &[])?;
        let mut sender = ChildProcess::spawn(self.bed.send_command(&self.id, port, &["--tcp-established"]))?;
        // The client's route moves as soon as the destination runs the
        // container (what the receiver's gratuitous ARP does on a shared
        // segment), not when the sender is done.
        let mut moved = false;
        let deadline = Instant::now() + Duration::from_secs(900);
        while matches!(sender.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            // (runc's state file and /proc, read without running runc.)
            if !moved && self.bed.dst_runc.live_init_pid(&self.id).is_ok() {
                self.net.route_via(Side::Destination)?;
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
            self.net.route_via(Side::Source)?;
        }
        let exit = |c: Option<i32>| c.map(|c| c.to_string()).unwrap_or_else(|| "none: killed".into());
        let said = |text: String| text.trim().lines().map(str::trim).collect::<Vec<_>>().join(" / ");
        if code != Some(0) {
            return Err(MigrationError::Other(format!(
                "the migration failed (sender exit {}) after {:.1} s; sender: {}; receiver: {}",
                exit(code),
                took.as_secs_f64(),
                said(sender.stderr()),
                said(receiver.stderr())
            )));
        }
        if received != Some(0) {
            return Err(MigrationError::Other(format!("the receiver failed (exit {}): {}", exit(received), said(receiver.stderr()))));
        }
        let result = sender.result().cloned().ok_or_else(|| MigrationError::Other("the sender printed no result event".into()))?;
        if result["ok"] != true {
            return Err(MigrationError::Other(format!("the sender's result is not ok: {result}")));
        }
        let received = receiver.result().cloned().ok_or_else(|| MigrationError::Other("the receiver printed no result event".into()))?;
        if result["rootfs_verified"] != true || received["rootfs_verified"] != true {
            return Err(MigrationError::Other(format!(
                "the destination did not prove its rootfs the source's: sender {result}, receiver {received}"
            )));
        }
        self.net.route_via(Side::Destination)?;
        let receiver_phases = receiver.events.iter().filter(|e| e["event"] == "phase").cloned().collect();
        Ok(Migrated { sender: result, receiver: received, receiver_phases, took })
    }

    /// Exactly one copy: runc on the source no longer knows the container
    /// and none of its processes is left (its pid namespace, `src_pidns`,
    /// is empty); the destination's runc runs it, in a pid namespace of its
    /// own. Returns the destination's container.
    pub fn exactly_one_copy(&self, src_pidns: u64) -> Result<FixtureContainer, MigrationError> {
        let fail = |m: String| Err(MigrationError::Other(m));
        if self.bed.src_runc.exists(&self.id)? {
            return fail("the source container is still known to runc".into());
        }
        if !self.bed.src_runc.list()?.is_empty() {
            return fail("the source runtime still has containers".into());
        }
        if wait_for(Duration::from_secs(10), || processes_in(src_pidns).is_empty().then_some(())).is_none() {
            return fail(format!("source processes still alive: {:?}", processes_in(src_pidns)));
        }
        let dst = self.bed.dst_container(&self.id);
        let st = self.bed.dst_runc.running(&self.id).map_err(|e| MigrationError::Other(format!("the destination does not run the container: {e}")))?;
        let dst_ns = pid_namespace(st.pid)?;
        if dst_ns == src_pidns {
            return fail("the destination's container is in the source's pid namespace".into());
        }
        if processes_in(dst_ns).is_empty() {
            return fail("the destination's container has no processes".into());
        }
        if dst.bundle.join(".ctmigrate-incomplete").exists() {
            return fail("the destination bundle is still marked incomplete".into());
        }
        Ok(dst)
    }

    /// Deletes the destination's container and checks that nothing of the
    /// migration is left on either host; the rest goes with the bed.
    pub fn finish(self, dst: FixtureContainer) -> Result<Timings, MigrationError> {
        let id = self.id.clone();
        drop(dst);
        let left = self.net.leftovers(&id, false);
        if !left.is_empty() {
            return Err(MigrationError::Other(format!("network left behind: {left:#?}")));
        }
        let bundle = self.bed.dst_bundles().join(&id);
        std::fs::remove_dir_all(&bundle).map_err(MigrationError::io(format!("removing the committed bundle {}", bundle.display())))?;
        let left = self.bed.leftovers(&id);
        if !left.is_empty() {
            return Err(MigrationError::Other(format!("left behind: {left:#?}")));
        }
        Ok(Timings { total: self.started.elapsed(), steps: self.timings.clone() })
    }
}

/// A thread doing one checked request after another on one connection:
/// `step(state, n)` makes request `n` and checks its answer. It hands its
/// state (the connection) back when stopped, for the final checks.
pub struct Client<S: Send + 'static> {
    name: &'static str,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    max_gap_us: Arc<AtomicU64>,
    stream: TcpStream,
    thread: Option<JoinHandle<Result<S, MigrationError>>>,
}

impl<S: Send + 'static> Client<S> {
    pub fn spawn(
        name: &'static str,
        stream: &TcpStream,
        mut state: S,
        mut step: impl FnMut(&mut S, u64) -> Result<(), MigrationError> + Send + 'static,
    ) -> Result<Self, MigrationError> {
        let stream = stream.try_clone().map_err(MigrationError::io("cloning the client's connection"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let max_gap_us = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, done, max_gap_us) = (stop.clone(), done.clone(), max_gap_us.clone());
            std::thread::spawn(move || -> Result<S, MigrationError> {
                let mut n = 0u64;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    step(&mut state, n).map_err(|e| MigrationError::Other(format!("{name}: request {n}: {e}")))?;
                    let gap = last.elapsed().as_micros() as u64;
                    max_gap_us.fetch_max(gap, Ordering::Relaxed);
                    last = Instant::now();
                    n += 1;
                    done.store(n, Ordering::Relaxed);
                }
                Ok(state)
            })
        };
        Ok(Client { name, stop, done, max_gap_us, stream, thread: Some(thread) })
    }

    /// Requests made and checked so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The longest time between two answers so far.
    pub fn longest_gap(&self) -> Duration {
        Duration::from_micros(self.max_gap_us.load(Ordering::Relaxed))
    }

    /// Fails if the client has stopped (a wrong answer, a lost connection).
    pub fn check_running(&mut self, context: &str) -> Result<(), MigrationError> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let why = match self.thread.take().map(JoinHandle::join) {
                Some(Ok(Err(e))) => e.to_string(),
                Some(Ok(Ok(_))) => "ended".into(),
                Some(Err(_)) => "panicked".into(),
                None => "gone".into(),
            };
            return Err(MigrationError::Other(format!("{context}: the {} client stopped after {} requests: {why}", self.name, self.done())));
        }
        if self.thread.is_none() {
            return Err(MigrationError::Other(format!("{context}: the {} client has stopped", self.name)));
        }
        Ok(())
    }

    /// Waits until `more` requests beyond those done now have succeeded.
    pub fn wait_progress(&mut self, more: u64, within: Duration, context: &str) -> Result<(), MigrationError> {
        let target = self.done() + more;
        let deadline = Instant::now() + within;
        while self.done() < target {
            self.check_running(context)?;
            if Instant::now() >= deadline {
                return Err(MigrationError::Other(format!("{context}: the {} client stalled at {} requests", self.name, self.done())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops after the request under way; returns the state, the number
    /// of requests and the longest time between two answers.
    pub fn stop(mut self) -> Result<(S, u64, Duration), MigrationError> {
        self.check_running("before stopping")?;
        self.stop.store(true, Ordering::Relaxed);
        let state = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(s))) => s,
            Some(Ok(Err(e))) => return Err(MigrationError::Other(format!("{e} (after {} requests)", self.done()))),
            _ => return Err(MigrationError::Other(format!("the {} client panicked", self.name))),
        };
        Ok((state, self.done(), self.longest_gap()))
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

/// A child process killed on drop (a client left running by a failure).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A deterministic byte stream (xorshift), for files whose digest the
/// client knows.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file into a rootfs (its directories first) with a mode and,
/// optionally, an owner.
pub fn write_file(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<(), MigrationError> {
    let what = || format!("writing {}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(MigrationError::io(what()))?;
    }
    let mut f = std::fs::File::create(path).map_err(MigrationError::io(what()))?;
    f.write_all(data).map_err(MigrationError::io(what()))?;
    drop(f);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(MigrationError::io(what()))?;
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g)).map_err(MigrationError::io(what()))?;
    }
    Ok(())
}

/// A token distinct per run, for values a restarted client would not
/// find.
pub fn run_token() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:x}-{}", now.as_nanos(), std::process::id())
}
