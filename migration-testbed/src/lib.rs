//! Two "hosts" on one machine and fixture containers to migrate between
//! them. Used by `ctmigrate validate` and by the integration tests.
//!
//! Each host is a network namespace joined to the other by a veth pair;
//! commands run in a host through `nsenter --net`, which keeps the
//! machine's mounts (and so its cgroup filesystems) as they are.
//!
//! Real services (`validate --workload`, tests/workloads.rs): [`debian`]
//! builds and caches their Debian rootfs, [`services`] sets one up with a
//! client namespace and moves it, [`redis`], [`nginx`] and [`postgres`]
//! hold each service and its checking client. [`validate`] is
//! `ctmigrate validate`: one whole migration between two such hosts.
//!
//! This is test machinery: the engine does not depend on it, and a
//! `ctmigrate` built without the tests' features carries only what
//! `validate` needs of it.

pub mod debian;
pub mod nginx;
pub mod postgres;
pub mod redis;
pub mod services;
pub mod validate;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use container_runtime::Runc;

use migration_engine::MigrationError;

/// Where install.sh puts the static fixture programs.
pub const DEFAULT_FIXTURE_DIR: &str = "/usr/local/libexec/ctmigrate";

fn run(cmd: &mut Command) -> Result<(), MigrationError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(MigrationError::io(format!("running {cmd:?}")))?;
    if !out.status.success() {
        return Err(MigrationError::Other(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A process-unique short tag for names (netns, veth, ids).
pub fn unique_tag(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 100_000)
}

/// Two network namespaces joined by a veth pair, removed on drop.
#[derive(Debug)]
pub struct HostPair {
    pub src: String,
    pub dst: String,
    pub src_ip: String,
    pub dst_ip: String,
}

impl HostPair {
    /// `tag` must be short (veth names are at most 15 bytes).
    pub fn create(tag: &str) -> Result<Self, MigrationError> {
        // A /30 inside 10.231.0.0/16 chosen from the tag: only these
        // namespaces ever hold these addresses.
        let h = tag.bytes().fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
        let (x, y) = ((h >> 8) % 256, (h % 64) * 4);
        let pair = HostPair {
            src: format!("ctm-{tag}-s"),
            dst: format!("ctm-{tag}-d"),
            src_ip: format!("10.231.{x}.{}", y + 1),
            dst_ip: format!("10.231.{x}.{}", y + 2),
        };
        let (vs, vd) = (format!("{tag}s"), format!("{tag}d"));
        if vs.len() > 15 {
            return Err(MigrationError::Usage(format!("host pair tag `{tag}` too long")));
        }
        run(Command::new("ip").args(["netns", "add", &pair.src]))?;
        // From here on, Drop removes what exists.
        run(Command::new("ip").args(["netns", "add", &pair.dst]))?;
        run(Command::new("ip").args(["link", "add", &vs, "netns", &pair.src, "type", "veth", "peer", "name", &vd, "netns", &pair.dst]))?;
        for (ns, dev, ip) in [(&pair.src, &vs, &pair.src_ip), (&pair.dst, &vd, &pair.dst_ip)] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        Ok(pair)
    }

    /// A command that runs `program` in the network namespace `ns`.
    pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
        c
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

/// What a fixture container runs.
#[derive(Debug, Clone)]
pub enum Workload {
    /// A shell loop writing `<token> <count>` to /counter every 50 ms; the
    /// token is drawn once at start, so a restart shows a new token.
    Counter,
    /// The static pattern fixture: `mib` MiB filled with a known pattern,
    /// re-verified continuously, `dirty_kib_per_s` rewritten per second;
    /// status in /status.
    Pattern { mib: u64, dirty_kib_per_s: u64 },
    /// The same, with only one word in eight random (the rest zero).
    CompressiblePattern { mib: u64, dirty_kib_per_s: u64 },
    /// A TCP echo server on `port` (busybox nc, one `cat` per connection).
    Echo { port: u16 },
}

pub const COUNTER_SCRIPT: &str = "tok=$(cat /proc/sys/kernel/random/uuid); i=0; \
    while true; do i=$((i+1)); echo \"$tok $i\" > /counter.tmp; mv /counter.tmp /counter; sleep 0.05; done";

fn busybox() -> Result<PathBuf, MigrationError> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| MigrationError::Preflight("busybox not found: run ./install.sh (busybox-static)".into()))
}

pub fn fixture_dir() -> PathBuf {
    std::env::var_os("CTMIGRATE_FIXTURE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_FIXTURE_DIR))
}

/// Builds an OCI bundle for `workload` in `dir` (rootfs + config.json).
pub fn build_bundle(runc_binary: &Path, dir: &Path, workload: &Workload) -> Result<(), MigrationError> {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(MigrationError::io("creating the fixture rootfs"))?;
    }
    std::fs::copy(busybox()?, rootfs.join("bin/busybox")).map_err(MigrationError::io("copying busybox"))?;
    for applet in ["sh", "cat", "mv", "sleep", "echo", "ls", "nc"] {
        let link = rootfs.join("bin").join(applet);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("busybox", &link).map_err(MigrationError::io("linking busybox applets"))?;
    }
    let args: Vec<String> = match workload {
        Workload::Counter => vec!["/bin/sh".into(), "-c".into(), COUNTER_SCRIPT.into()],
        Workload::Pattern { mib, dirty_kib_per_s } | Workload::CompressiblePattern { mib, dirty_kib_per_s } => {
            let src = fixture_dir().join("pattern-fixture");
            std::fs::copy(&src, rootfs.join("bin/pattern-fixture")).map_err(|e| {
                MigrationError::Preflight(format!("{}: {e}; run ./install.sh, which builds the fixtures", src.display()))
            })?;
            let mut args = vec!["/bin/pattern-fixture".into(), mib.to_string(), dirty_kib_per_s.to_string(), "/status".into()];
            if matches!(workload, Workload::CompressiblePattern { .. }) {
                args.push("compressible".into());
            }
            args
        }
        Workload::Echo { port } => vec!["/bin/nc".into(), "-ll".into(), "-p".into(), port.to_string(), "-e".into(), "/bin/cat".into()],
    };
    let _ = std::fs::remove_file(dir.join("config.json"));
    run(Command::new(runc_binary).arg("spec").arg("--bundle").arg(dir))?;
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).map_err(MigrationError::io("reading config.json"))?)
        .map_err(|e| MigrationError::Other(e.to_string()))?;
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = args.into();
    cfg["root"]["readonly"] = false.into();
    cfg["hostname"] = "ctmigrate-fixture".into();
    let text = serde_json::to_vec_pretty(&cfg).map_err(|e| MigrationError::Other(e.to_string()))?;
    std::fs::write(&path, text).map_err(MigrationError::io("writing config.json"))?;
    Ok(())
}

/// Makes the bundle's container join the network namespace at `netns`
/// (as CNI plugins and engines set containers up).
pub fn join_network_namespace(bundle: &Path, netns: &Path) -> Result<(), MigrationError> {
    join_namespace(bundle, "network", netns)
}

/// Makes the bundle's container join the IPC namespace at `ipc` (a
/// `/proc/PID/ns/ipc`, as a Kubernetes pod's containers join their pause
/// container's).
pub fn join_ipc_namespace(bundle: &Path, ipc: &Path) -> Result<(), MigrationError> {
    join_namespace(bundle, "ipc", ipc)
}

fn join_namespace(bundle: &Path, kind: &str, ns: &Path) -> Result<(), MigrationError> {
    let path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).map_err(MigrationError::io("reading config.json"))?)
        .map_err(|e| MigrationError::Other(e.to_string()))?;
    let namespaces = cfg["linux"]["namespaces"].as_array_mut().ok_or_else(|| MigrationError::Other("config.json has no namespaces".into()))?;
    namespaces.retain(|n| n["type"] != kind);
    namespaces.push(serde_json::json!({"type": kind, "path": ns}));
    let text = serde_json::to_vec_pretty(&cfg).map_err(|e| MigrationError::Other(e.to_string()))?;
    std::fs::write(&path, text).map_err(MigrationError::io("writing config.json"))
}

/// The network of the TCP-connection tests: a bridge `br-ct` on each host
/// holding the container subnet's gateway address, a client namespace with
/// a link to each host, and routes so that the container's address is
/// reached through whichever host the client's route names. The source
/// container's namespace is a named one (`ctm-<tag>-ct`) with `eth0` on
/// the source's bridge. Everything is removed on drop.
///
/// [`ContainerNetwork::create_shared_segment`] wires the same namespaces as
/// one L2 segment instead: the client's namespace holds a switch (bridge
/// `seg`) with a port to each host's `br-ct` and the client's address in
/// the container subnet, so that nothing but ARP (and the switches'
/// learning) tells where the container's address lives.
pub struct ContainerNetwork {
    pub tag: String,
    pub src: String,
    pub dst: String,
    pub client: String,
    pub container_netns: String,
    pub bridge: String,
    pub container_ip: std::net::Ipv4Addr,
    pub container_mac: String,
    pub client_ip: std::net::Ipv4Addr,
    subnet: String,
    via_src: String,
    via_dst: String,
    /// One L2 segment: no routes to move.
    shared_segment: bool,
    /// Links each host keeps besides what a migration adds.
    own_links: Vec<(String, Vec<String>)>,
}

/// Which host the client's route to the container goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl ContainerNetwork {
    pub fn create(bed: &Testbed) -> Result<Self, MigrationError> {
        Self::build(bed, false)
    }

    /// The client and both hosts on one L2 segment (see the type's doc).
    pub fn create_shared_segment(bed: &Testbed) -> Result<Self, MigrationError> {
        Self::build(bed, true)
    }

    fn build(bed: &Testbed, shared_segment: bool) -> Result<Self, MigrationError> {
        let tag = bed.tag.clone();
        let h = tag.bytes().fold(11u32, |a, b| a.wrapping_mul(37).wrapping_add(b as u32));
        let x = h % 256;
        let (src, dst) = (bed.hosts.src.clone(), bed.hosts.dst.clone());
        let host_link = |s: &str| format!("{}{s}", &bed.tag);
        let net = ContainerNetwork {
            client: format!("ctm-{tag}-c"),
            container_netns: format!("ctm-{tag}-ct"),
            bridge: "br-ct".into(),
            container_ip: std::net::Ipv4Addr::new(10, 232, x as u8, 10),
            container_mac: format!("02:c7:00:00:{:02x}:0a", x),
            client_ip: if shared_segment { std::net::Ipv4Addr::new(10, 232, x as u8, 9) } else { std::net::Ipv4Addr::new(10, 233, x as u8, 9) },
            subnet: format!("10.232.{x}.0/24"),
            via_src: format!("10.234.{x}.1"),
            via_dst: format!("10.234.{x}.5"),
            shared_segment,
            own_links: vec![
                (src.clone(), vec!["lo".into(), format!("{tag}s"), "br-ct".into(), host_link("sc"), host_link("h0")]),
                (dst.clone(), vec!["lo".into(), format!("{tag}d"), "br-ct".into(), host_link("dc")]),
            ],
            src,
            dst,
            tag,
        };
        // Drop removes what exists if a step fails.
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        let sysctl = |ns: &str, key: &str| {
            run(HostPair::command_in(ns, "sh").args(["-c", &format!("echo 1 > /proc/sys/{key}")]))
        };
        ip(&["netns", "add", &net.client])?;
        ip(&["netns", "add", &net.container_netns])?;
        let gw = format!("10.232.{x}.1/24");
        for host in [&net.src, &net.dst] {
            ip(&["-n", host, "link", "add", "br-ct", "type", "bridge"])?;
            // On one segment only the source holds the gateway's address.
            if !shared_segment || host == &net.src {
                ip(&["-n", host, "addr", "add", &gw, "dev", "br-ct"])?;
            }
            ip(&["-n", host, "link", "set", "br-ct", "up"])?;
            sysctl(host, "net/ipv4/ip_forward")?;
        }
        if shared_segment {
            // The switch, in the client's namespace, with the client's
            // address; a port to each host's bridge.
            ip(&["-n", &net.client, "link", "set", "lo", "up"])?;
            ip(&["-n", &net.client, "link", "add", "seg", "type", "bridge"])?;
            ip(&["-n", &net.client, "addr", "add", &format!("{}/24", net.client_ip), "dev", "seg"])?;
            ip(&["-n", &net.client, "link", "set", "seg", "up"])?;
            for (host, here, there) in [(&net.src, host_link("sc"), host_link("cs")), (&net.dst, host_link("dc"), host_link("cd"))] {
                ip(&["link", "add", &here, "netns", host, "type", "veth", "peer", "name", &there, "netns", &net.client])?;
                ip(&["-n", host, "link", "set", &here, "master", "br-ct", "up"])?;
                ip(&["-n", &net.client, "link", "set", &there, "master", "seg", "up"])?;
            }
        }
        // Client: its address on loopback, a /30 to each host.
        let client_addr = format!("{}/32", net.client_ip);
        if !shared_segment {
            ip(&["-n", &net.client, "link", "set", "lo", "up"])?;
            ip(&["-n", &net.client, "addr", "add", &client_addr, "dev", "lo"])?;
        }
        for (host, here, there, host_addr, client_side) in [
            (&net.src, host_link("sc"), host_link("cs"), format!("10.234.{x}.1/30"), format!("10.234.{x}.2/30")),
            (&net.dst, host_link("dc"), host_link("cd"), format!("10.234.{x}.5/30"), format!("10.234.{x}.6/30")),
        ] {
            if shared_segment {
                break;
            }
            ip(&["link", "add", &here, "netns", host, "type", "veth", "peer", "name", &there, "netns", &net.client])?;
            ip(&["-n", host, "addr", "add", &host_addr, "dev", &here])?;
            ip(&["-n", host, "link", "set", &here, "up"])?;
            ip(&["-n", &net.client, "addr", "add", &client_side, "dev", &there])?;
            ip(&["-n", &net.client, "link", "set", &there, "up"])?;
            let back = client_side.replace("/30", "");
            ip(&["-n", host, "route", "add", &client_addr, "via", &back])?;
        }
        // The source container's namespace, wired to the source bridge.
        let ct = &net.container_netns;
        let hostend = host_link("h0");
        ip(&["link", "add", &hostend, "netns", &net.src, "type", "veth", "peer", "name", "eth0", "netns", ct])?;
        ip(&["-n", &net.src, "link", "set", &hostend, "master", "br-ct", "up"])?;
        ip(&["-n", ct, "link", "set", "eth0", "address", &net.container_mac])?;
        ip(&["-n", ct, "addr", "add", &format!("{}/24", net.container_ip), "dev", "eth0"])?;
        ip(&["-n", ct, "link", "set", "eth0", "up"])?;
        ip(&["-n", ct, "link", "set", "lo", "up"])?;
        ip(&["-n", ct, "route", "add", "default", "via", &format!("10.232.{x}.1")])?;
        net.route_via(Side::Source)?;
        Ok(net)
    }

    pub fn container_netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.container_netns)
    }

    /// Points the client's route to the container subnet at one host (on
    /// a shared segment there is none: ARP moves the address).
    pub fn route_via(&self, side: Side) -> Result<(), MigrationError> {
        if self.shared_segment {
            return Ok(());
        }
        let via = if side == Side::Source { &self.via_src } else { &self.via_dst };
        let src = self.client_ip.to_string();
        run(Command::new("ip").args(["-n", &self.client, "route", "replace", &self.subnet, "via", via, "src", &src]))
    }

    /// What the network of a migration left behind: namespaces, links and
    /// bridge ports on either host, and lock or CRIU rules anywhere.
    /// `source_netns` says whether the source container's namespace should
    /// still exist (it goes after a successful migration).
    pub fn leftovers(&self, dest_id: &str, source_netns: bool) -> Vec<String> {
        let mut out = Vec::new();
        let netns_list = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let names: Vec<&str> = netns_list.lines().filter_map(|l| l.split_whitespace().next()).collect();
        let dest_ns = format!("ctmigrate-{dest_id}");
        if names.contains(&dest_ns.as_str()) {
            out.push(format!("network namespace {dest_ns}"));
        }
        if names.contains(&self.container_netns.as_str()) != source_netns {
            out.push(format!("source namespace {} {}", self.container_netns, if source_netns { "is gone" } else { "is still there" }));
        }
        for (host, keep) in &self.own_links {
            let links = Command::new("ip").args(["-n", host, "-o", "link", "show"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            for l in links.lines() {
                let name = l.split(": ").nth(1).unwrap_or("").split('@').next().unwrap_or("");
                let expected_source_end = name == format!("{}h0", self.tag) && source_netns;
                if !keep.iter().any(|k| k == name) || (name == format!("{}h0", self.tag) && !expected_source_end) {
                    out.push(format!("link {name} in {host}"));
                }
            }
        }
        let mut namespaces = vec![self.src.clone(), self.dst.clone(), self.client.clone()];
        if source_netns {
            namespaces.push(self.container_netns.clone());
        }
        for ns in namespaces {
            let nft = HostPair::command_in(&ns, "nft").args(["list", "tables"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            out.extend(nft.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("nftables {} in {ns}", l.trim())));
            let ipt = HostPair::command_in(&ns, "iptables-save").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            out.extend(ipt.lines().filter(|l| l.contains("CRIU") || l.starts_with("-A")).map(|l| format!("iptables `{l}` in {ns}")));
        }
        out
    }
}

impl Drop for ContainerNetwork {
    fn drop(&mut self) {
        for ns in [&self.client, &self.container_netns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        for host in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["-n", host, "link", "del", "br-ct"]).stderr(Stdio::null()).status();
        }
    }
}

/// A container started for a test; killed and deleted on drop.
pub struct FixtureContainer {
    pub runc: Runc,
    pub id: String,
    pub bundle: PathBuf,
}

impl FixtureContainer {
    pub fn start(runc: Runc, id: &str, bundle: &Path) -> Result<Self, MigrationError> {
        runc.run_detached(id, bundle)?;
        Ok(Self { runc, id: id.to_string(), bundle: bundle.to_path_buf() })
    }

    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }
}

impl Drop for FixtureContainer {
    fn drop(&mut self) {
        force_remove(&self.runc, &self.id);
    }
}

/// Kills and deletes `id` if runc knows it, thawing it first if frozen.
pub fn force_remove(runc: &Runc, id: &str) {
    if let Ok(st) = runc.internal_state(id) {
        if let Ok(f) = container_runtime::Freezer::for_container(&st) {
            let _ = f.thaw();
        }
    }
    if runc.exists(id).unwrap_or(false) {
        let _ = runc.kill(id, "KILL");
        let _ = runc.delete_force(id);
    }
}

/// `(token, count)` from a counter fixture's /counter.
pub fn read_counter(rootfs: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(rootfs.join("counter")).ok()?;
    let (tok, n) = text.trim().split_once(' ')?;
    Some((tok.to_string(), n.parse().ok()?))
}

/// The pattern fixture's /status: `<token> pass=<n> <ok|CORRUPT...>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternStatus {
    pub token: String,
    pub passes: u64,
    pub ok: bool,
    /// Longest heartbeat gap the fixture saw, in microseconds.
    pub max_gap_us: u64,
    pub line: String,
}

pub fn read_pattern_status(rootfs: &Path) -> Option<PatternStatus> {
    let line = std::fs::read_to_string(rootfs.join("status")).ok()?.trim().to_string();
    let mut parts = line.split_whitespace();
    let token = parts.next()?.to_string();
    let passes = parts.next()?.strip_prefix("pass=")?.parse().ok()?;
    let ok = parts.next()? == "ok";
    let max_gap_us = parts.next().and_then(|p| p.strip_prefix("maxgap_us=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some(PatternStatus { token, passes, ok, max_gap_us, line })
}

/// The pattern fixture's heartbeat file (/status.beat, every 100 ms):
/// its token and beat count.
pub fn read_pattern_beat(rootfs: &Path) -> Option<(String, u64)> {
    let line = std::fs::read_to_string(rootfs.join("status.beat")).ok()?;
    let mut parts = line.split_whitespace();
    let token = parts.next()?.to_string();
    let beats = parts.next()?.strip_prefix("beat=")?.parse().ok()?;
    Some((token, beats))
}

/// Polls `f` every 20 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `--tls-dir DIR` unless the caller chose its own security options.
fn tls_args(extra: &[&str], dir: &Path) -> Vec<std::ffi::OsString> {
    if extra.iter().any(|a| *a == "--tls-dir" || *a == "--insecure") {
        Vec::new()
    } else {
        vec!["--tls-dir".into(), dir.as_os_str().to_owned()]
    }
}

/// One local migration setup: two hosts, a runtime root, bundle root and
/// work directory for each, all below `dir`, all removed on drop.
pub struct Testbed {
    pub hosts: HostPair,
    pub dir: PathBuf,
    pub tag: String,
    pub exe: PathBuf,
    pub runc_binary: PathBuf,
    pub src_runc: Runc,
    pub dst_runc: Runc,
    pub cgroup_parent: String,
    /// Where both sides write their audit logs, and so keep a failed
    /// migration's CRIU logs (`failed/` beside them): the testbed's own
    /// directory, or the host's (`validate`, whose failures a user reads
    /// after the testbed is gone).
    pub audit_dir: PathBuf,
}

impl Testbed {
    /// `exe` is the ctmigrate binary to run on each side.
    pub fn create(prefix: &str, exe: &Path) -> Result<Self, MigrationError> {
        let tag = unique_tag(prefix);
        let dir = PathBuf::from(migration_engine::DEFAULT_WORK_ROOT).join(format!("testbed-{tag}"));
        std::fs::create_dir_all(&dir).map_err(MigrationError::io(format!("creating {}", dir.display())))?;
        let hosts = match HostPair::create(&tag) {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let runc_binary = std::env::var_os("CTMIGRATE_RUNC").map(PathBuf::from).unwrap_or_else(|| "runc".into());
        // Each testbed has its own CA: the receiver's certificate names its
        // address, the sender's is "source".
        if let Err(e) = migration_engine::tls::init_certs(&dir.join("tls"), &[hosts.dst_ip.clone(), "source".into()]) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Self {
            src_runc: Runc::new(&runc_binary, dir.join("src-runc")),
            dst_runc: Runc::new(&runc_binary, dir.join("dst-runc")),
            cgroup_parent: format!("/ctmigrate-{tag}"),
            runc_binary,
            hosts,
            audit_dir: dir.clone(),
            dir,
            tag,
            exe: exe.to_path_buf(),
        })
    }

    pub fn dst_bundles(&self) -> PathBuf {
        self.dir.join("dst-bundles")
    }

    /// The receiver's TLS directory (certificate for its address).
    pub fn dst_tls(&self) -> PathBuf {
        self.dir.join("tls").join(&self.hosts.dst_ip)
    }

    /// The sender's TLS directory.
    pub fn src_tls(&self) -> PathBuf {
        self.dir.join("tls").join("source")
    }

    pub fn audit_log(&self, side: &str) -> PathBuf {
        self.audit_dir.join(format!("audit-{side}.log"))
    }

    /// Each host's migration journal (`--journal-dir`): "src" or "dst".
    pub fn journal_dir(&self, side: &str) -> PathBuf {
        self.dir.join(format!("journal-{side}"))
    }

    /// Drops every packet between the two hosts (both directions), as a
    /// cable pulled: nothing is refused or reset, it just goes nowhere.
    pub fn cut_link(&self) -> Result<(), MigrationError> {
        let rules = "table inet ctmigrate_test_cut {\n\
            chain in { type filter hook input priority -300; policy accept; iif != \"lo\" drop; }\n\
            chain out { type filter hook output priority -300; policy accept; oif != \"lo\" drop; }\n}\n";
        let mut child = HostPair::command_in(&self.hosts.dst, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(MigrationError::io("starting nft"))?;
        std::io::Write::write_all(child.stdin.as_mut().expect("piped"), rules.as_bytes()).map_err(MigrationError::io("writing nft rules"))?;
        drop(child.stdin.take());
        match child.wait() {
            Ok(s) if s.success() => Ok(()),
            other => Err(MigrationError::Other(format!("nft could not cut the link: {other:?}"))),
        }
    }

    /// Undoes [`cut_link`](Self::cut_link).
    pub fn restore_link(&self) {
        let _ = HostPair::command_in(&self.hosts.dst, "nft")
            .args(["delete", "table", "inet", "ctmigrate_test_cut"])
            .stderr(Stdio::null())
            .status();
    }

    /// `ctmigrate resolve ID` on host `side` ("src" or "dst"), run in that
    /// host's namespace.
    pub fn resolve_command(&self, side: &str, id: &str, extra: &[&str]) -> Command {
        let host = if side == "src" { &self.hosts.src } else { &self.hosts.dst };
        let mut c = HostPair::command_in(host, &self.exe);
        c.arg("resolve").arg(id).arg("--journal-dir").arg(self.journal_dir(side)).args(extra);
        c
    }

    pub fn src_work(&self) -> PathBuf {
        self.dir.join("src-work")
    }

    pub fn dst_work(&self) -> PathBuf {
        self.dir.join("dst-work")
    }

    /// Builds a bundle and starts a fixture container on the source host.
    pub fn start_fixture(&self, id: &str, workload: &Workload) -> Result<FixtureContainer, MigrationError> {
        let bundle = self.fixture_bundle(id, workload)?;
        FixtureContainer::start(self.src_runc.clone(), id, &bundle)
    }

    /// Builds a source-host bundle for `workload` without starting it (for
    /// a test to change its config.json first); start it with
    /// [`FixtureContainer::start`] and `src_runc`.
    pub fn fixture_bundle(&self, id: &str, workload: &Workload) -> Result<PathBuf, MigrationError> {
        let bundle = self.dir.join("src-bundles").join(id);
        std::fs::create_dir_all(&bundle).map_err(MigrationError::io("creating the fixture bundle"))?;
        build_bundle(&self.runc_binary, &bundle, workload)?;
        Ok(bundle)
    }

    /// The destination's view of a migrated container.
    pub fn dst_container(&self, id: &str) -> FixtureContainer {
        FixtureContainer { runc: self.dst_runc.clone(), id: id.to_string(), bundle: self.dst_bundles().join(id) }
    }

    /// The receive command, to run in the destination host.
    pub fn receive_command(&self, port: u16, extra: &[&str]) -> Command {
        let mut c = HostPair::command_in(&self.hosts.dst, &self.exe);
        // This host's own receiver configuration (/etc/ctmigrate/
        // receiver.toml, a service's) is not the test hosts'.
        c.arg("receive")
            .arg("--no-config")
            .arg("--listen")
            .arg(format!("{}:{port}", self.hosts.dst_ip))
            .arg("--bundle-root")
            .arg(self.dst_bundles())
            .arg("--runtime-root")
            .arg(&self.dst_runc.root)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--work-dir")
            .arg(self.dst_work())
            .args(tls_args(extra, &self.dst_tls()))
            .arg("--audit-log")
            .arg(self.audit_log("dst"))
            .arg("--journal-dir")
            .arg(self.journal_dir("dst"))
            .arg("--json")
            .args(extra);
        c
    }

    /// Starts a receiver and waits until it listens.
    pub fn spawn_receiver(&self, port: u16, extra: &[&str], envs: &[(&str, &str)]) -> Result<ChildProcess, MigrationError> {
        let mut cmd = self.receive_command(port, extra);
        cmd.envs(envs.iter().copied());
        let mut child = ChildProcess::spawn(cmd)?;
        // Generous: a receiver first sweeps what dead receivers left (runc,
        // netns, mounts), which in the emulated pre-copy guest has taken
        // over 10 s.
        child.wait_for_event("listening", std::time::Duration::from_secs(60))?;
        Ok(child)
    }

    /// The send command, to run in the source host.
    pub fn send_command(&self, id: &str, port: u16, extra: &[&str]) -> Command {
        self.source_command(&["send", id], port, extra)
    }

    /// `ctmigrate evacuate` of the source's runtime root, to run in the
    /// source host.
    pub fn evacuate_command(&self, port: u16, extra: &[&str]) -> Command {
        self.source_command(&["evacuate"], port, extra)
    }

    /// A ctmigrate command with the sender's options (`head` is the
    /// subcommand and its operands), to run in the source host.
    pub fn source_command_for(&self, head: &[&str], port: u16, extra: &[&str]) -> Command {
        self.source_command(head, port, extra)
    }

    fn source_command(&self, head: &[&str], port: u16, extra: &[&str]) -> Command {
        let mut c = HostPair::command_in(&self.hosts.src, &self.exe);
        c.args(head)
            .arg("--to")
            .arg(format!("tcp://{}:{port}", self.hosts.dst_ip))
            .arg("--runtime-root")
            .arg(&self.src_runc.root)
            .arg("--work-dir")
            .arg(self.src_work())
            .args(tls_args(extra, &self.src_tls()))
            .arg("--audit-log")
            .arg(self.audit_log("src"))
            .arg("--journal-dir")
            .arg(self.journal_dir("src"))
            .arg("--json")
            .args(extra);
        c
    }

    /// Runs a sender to completion: exit code, JSON events, stderr.
    pub fn run_sender(&self, id: &str, port: u16, extra: &[&str], envs: &[(&str, &str)]) -> Result<CommandResult, MigrationError> {
        let mut cmd = self.send_command(id, port, extra);
        cmd.envs(envs.iter().copied());
        CommandResult::run(cmd)
    }

    /// Everything a migration may have left on either host, as text (empty
    /// when clean): runtime state, bundles, image directories, cgroups.
    pub fn leftovers(&self, dest_id: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(ids) = self.dst_runc.list() {
            out.extend(ids.into_iter().map(|i| format!("destination runtime has container {i}")));
        }
        if let Ok(rd) = std::fs::read_dir(self.dst_bundles()) {
            out.extend(rd.flatten().map(|e| format!("destination bundle {}", e.path().display())));
        }
        // State runc itself no longer lists (a restore killed midway).
        if let Ok(rd) = std::fs::read_dir(&self.dst_runc.root) {
            let listed = self.dst_runc.list().unwrap_or_default();
            out.extend(
                rd.flatten()
                    .filter(|e| e.path().is_dir() && !listed.contains(&e.file_name().to_string_lossy().into_owned()))
                    .map(|e| format!("destination runtime state {}", e.path().display())),
            );
        }
        // Any mount left below the bundles or the runtime state.
        let mounts = container_runtime::procinfo::own_mountinfo().ok();
        let mounts_below = |dir: &Path| {
            mounts.iter().flat_map(|m| container_runtime::procinfo::mount_points_below(m, dir)).map(|m| format!("mount {}", m.display())).collect::<Vec<_>>()
        };
        for dir in [self.dst_bundles(), self.dst_runc.root.clone()] {
            out.extend(mounts_below(&dir));
        }
        for w in [self.src_work(), self.dst_work()] {
            if let Ok(rd) = std::fs::read_dir(&w) {
                out.extend(rd.flatten().map(|e| format!("work directory {}", e.path().display())));
            }
            // A mount left under a work directory (an images tmpfs, a tmpfs
            // made for a restore).
            out.extend(mounts_below(&w));
        }
        // A migration either host's journal still holds open.
        for side in ["src", "dst"] {
            for entry in migration_engine::journal::Journal::new(self.journal_dir(side)).list() {
                match entry {
                    Ok(e) if !e.is_finished() => out.push(format!("{side} journal: migration {} of {} is {}", e.id, e.container, e.state_name())),
                    Ok(_) => {}
                    Err(e) => out.push(format!("{side} journal: {e}")),
                }
            }
        }
        // An IPC namespace made for a pod led by it.
        let ipc = container_network::ipcns::ipc_namespace_path(dest_id);
        if ipc.exists() {
            out.push(format!("IPC namespace {}", ipc.display()));
        }
        let cg = format!("{}/{dest_id}", self.cgroup_parent.trim_start_matches('/'));
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let p = h.path().join(&cg);
                if p.exists() {
                    out.push(format!("cgroup {}", p.display()));
                }
            }
        }
        out
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for runc in [&self.src_runc, &self.dst_runc] {
            for id in runc.list().unwrap_or_default() {
                force_remove(runc, &id);
            }
        }
        // Empty cgroup parents this testbed's receivers created.
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let _ = std::fs::remove_dir(h.path().join(self.cgroup_parent.trim_start_matches('/')));
            }
        }
        // A failing test shows what its failed migrations' logs say (the
        // testbed and they are gone after it, in CI too).
        if std::thread::panicking() {
            print_failure_logs(&self.dir.join("failed"));
        }
        // CTMIGRATE_KEEP_FAILED=DIR keeps the failure logs of a test's
        // migrations (CRIU's and runc's) for a developer to read.
        if let Some(keep) = std::env::var_os("CTMIGRATE_KEEP_FAILED") {
            let failed = self.dir.join("failed");
            if failed.is_dir() {
                let _ = std::fs::create_dir_all(&keep);
                let _ = std::process::Command::new("cp").arg("-a").arg(&failed).arg(std::path::Path::new(&keep).join(&self.tag)).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prints to stderr, for each log a failed migration kept under `failed`,
/// its error lines and its last lines.
fn print_failure_logs(failed: &Path) {
    let Ok(attempts) = std::fs::read_dir(failed) else { return };
    for attempt in attempts.flatten() {
        let Ok(logs) = std::fs::read_dir(attempt.path()) else { continue };
        for log in logs.flatten() {
            let Ok(text) = std::fs::read_to_string(log.path()) else { continue };
            let lines: Vec<&str> = text.lines().collect();
            let errors: Vec<&str> = lines.iter().copied().filter(|l| l.contains("Error") || l.contains("rror (")).take(20).collect();
            eprintln!("--- {} ({} lines): errors:\n{}\n--- its last lines:", log.path().display(), lines.len(), errors.join("\n"));
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// A spawned ctmigrate whose stdout carries JSON events.
pub struct ChildProcess {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub events: Vec<serde_json::Value>,
    stderr_file: tempfile::NamedTempFile,
}

impl ChildProcess {
    pub fn spawn(mut cmd: Command) -> Result<Self, MigrationError> {
        let stderr_file = tempfile::NamedTempFile::new().map_err(MigrationError::io("creating a stderr file"))?;
        let stderr = stderr_file.reopen().map_err(MigrationError::io("opening the stderr file"))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(MigrationError::io(format!("spawning {cmd:?}")))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(MigrationError::Other(format!("{cmd:?}: no stdout")));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines: rx, events: Vec::new(), stderr_file })
    }

    /// Waits for an event named `name`; returns it.
    pub fn wait_for_event(&mut self, name: &str, timeout: std::time::Duration) -> Result<serde_json::Value, MigrationError> {
        if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
            return Ok(e.clone());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        let hit = v["event"] == name;
                        self.events.push(v.clone());
                        if hit {
                            return Ok(v);
                        }
                    }
                }
                Err(_) => {
                    return Err(MigrationError::Other(format!(
                        "no `{name}` event within {timeout:?}; stderr: {}",
                        self.stderr()
                    )))
                }
            }
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_file.path()).unwrap_or_default()
    }

    /// Waits (up to `timeout`) for an event that `matches`; false if the
    /// process ended or the time ran out first.
    pub fn wait_until(&mut self, timeout: std::time::Duration, matches: impl Fn(&serde_json::Value) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            self.poll_events();
            if self.events.iter().any(&matches) {
                return true;
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                self.poll_events();
                return self.events.iter().any(&matches);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }

    /// Waits for the `phase` event `phase` (see [`wait_until`](Self::wait_until)).
    pub fn reached_phase(&mut self, phase: &str, timeout: std::time::Duration) -> bool {
        self.wait_until(timeout, |e| e["event"] == "phase" && e["phase"] == phase)
    }

    /// Takes in the events written so far, without waiting.
    pub fn poll_events(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            if let Ok(v) = serde_json::from_str(&line) {
                self.events.push(v);
            }
        }
    }

    /// Waits for exit (up to `timeout`, then kills); returns the exit code.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_millis(50)) {
                    if let Ok(v) = serde_json::from_str(&line) {
                        self.events.push(v);
                    }
                }
                return st.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The last `result` event seen.
    pub fn result(&self) -> Option<&serde_json::Value> {
        self.events.iter().rev().find(|e| e["event"] == "result")
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A finished command: exit code, JSON events from stdout, stderr.
#[derive(Debug)]
pub struct CommandResult {
    pub code: Option<i32>,
    pub events: Vec<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandResult {
    pub fn run(mut cmd: Command) -> Result<Self, MigrationError> {
        let out = cmd.stdin(Stdio::null()).output().map_err(MigrationError::io(format!("running {cmd:?}")))?;
        let events = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        Ok(Self {
            code: out.status.code(),
            events,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    pub fn result(&self) -> Option<&serde_json::Value> {
        self.events.iter().rev().find(|e| e["event"] == "result")
    }
}

/// A TCP connection made from inside the network namespace `ns` (the
/// socket keeps that namespace), for tests that speak the protocol
/// themselves.
pub fn connect_from(ns: &str, addr: std::net::SocketAddr) -> Result<std::net::TcpStream, MigrationError> {
    let ns = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        // setns changes only this thread's namespace.
        let f = std::fs::File::open(&ns).map_err(MigrationError::io(format!("opening {ns}")))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| MigrationError::Other(format!("setns: {e}")))?;
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).map_err(MigrationError::io("connecting"))
    })
    .join()
    .map_err(|_| MigrationError::Other("connect thread panicked".into()))?
}
