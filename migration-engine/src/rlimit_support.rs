//! Can CRIU read the resource limits of the container's tasks?
//!
//! CRIU dumps each task's rlimits with `prlimit()`, which for a task whose
//! uids and gids are not all the caller's needs `CAP_SYS_RESOURCE`. Root
//! without that capability (a bounding set that lacks it) cannot dump any
//! task of another user with a stock CRIU: "Can't get rlimit 0: Operation
//! not permitted". ctmigrate's own CRIU patch
//! (`criu-patches/0001-rlimit-fallback-to-proc-limits.patch`) reads
//! `/proc/PID/limits` instead when `prlimit()` is refused. `install.sh`
//! applies it when it builds CRIU from source and records the build in a
//! marker file ([`DEFAULT_MARKER`]): the installed binary, its sha256 and
//! the patches.
//!
//! This module answers: does this process have `CAP_SYS_RESOURCE`, does
//! the CRIU binary in use carry the patch, and (for the sender's
//! preflight) which of a container's tasks a stock CRIU could not dump.

use std::path::{Path, PathBuf};

use container_runtime::procinfo::Status;
use serde::{Deserialize, Serialize};

/// The patch's file name, as `install.sh` records it in the marker.
pub const RLIMIT_PATCH: &str = "0001-rlimit-fallback-to-proc-limits.patch";
/// Where `install.sh` records what CRIU it built.
pub const DEFAULT_MARKER: &str = "/usr/local/share/ctmigrate/criu-build.json";
/// The capability's bit in the `Cap*` masks.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// What `install.sh` wrote about the CRIU it built.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct BuildMarker {
    pub binary: PathBuf,
    pub sha256: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub patches: Vec<MarkerPatch>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct MarkerPatch {
    pub name: String,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// Whether the CRIU binary in use carries the rlimit patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchStatus {
    /// The marker records this very binary (same sha256), built with the patch.
    Patched { binary: PathBuf },
    /// No marker: not a CRIU that install.sh built (a distribution's, or
    /// one installed by hand), or one built before it kept a marker.
    NoMarker { binary: PathBuf, marker: PathBuf },
    /// The marker records another binary than the one in use.
    OtherBinary { binary: PathBuf, recorded: PathBuf },
    /// The marker records this binary, built without the patch.
    WithoutPatch { binary: PathBuf, patches: Vec<String> },
    /// The binary or the marker cannot be read.
    Unknown { reason: String },
}

impl PatchStatus {
    pub fn is_patched(&self) -> bool {
        matches!(self, PatchStatus::Patched { .. })
    }

    /// One line for `check` and errors.
    pub fn describe(&self) -> String {
        match self {
            PatchStatus::Patched { binary } => {
                format!("{} carries ctmigrate's rlimit patch (reads /proc/PID/limits when prlimit is refused)", binary.display())
            }
            PatchStatus::NoMarker { binary, marker } => {
                format!("{} is not a CRIU built by install.sh with ctmigrate's rlimit patch (no {})", binary.display(), marker.display())
            }
            PatchStatus::OtherBinary { binary, recorded } => format!(
                "{} is not the CRIU install.sh built with ctmigrate's rlimit patch ({})",
                binary.display(),
                recorded.display()
            ),
            PatchStatus::WithoutPatch { binary, patches } => format!(
                "{} was built without ctmigrate's rlimit patch (patches: {})",
                binary.display(),
                if patches.is_empty() { "none".to_string() } else { patches.join(", ") }
            ),
            PatchStatus::Unknown { reason } => format!("cannot tell whether CRIU carries ctmigrate's rlimit patch: {reason}"),
        }
    }
}

/// This process's effective capability mask (`CapEff` of
/// `/proc/self/status`); `None` if it cannot be read.
pub fn effective_caps() -> Option<u64> {
    procfs::process::Process::myself().and_then(|p| p.status()).ok().map(|s| s.capeff)
}

/// Whether a task's status shows `CAP_SYS_RESOURCE` effective.
pub fn status_has_cap_sys_resource(status: &Status) -> bool {
    caps_have_sys_resource(status.capeff)
}

fn caps_have_sys_resource(caps: u64) -> bool {
    caps & (1 << CAP_SYS_RESOURCE) != 0
}

/// Whether this process has `CAP_SYS_RESOURCE` (CRIU, its child, gets
/// the same capabilities).
pub fn has_cap_sys_resource() -> bool {
    effective_caps().is_some_and(caps_have_sys_resource)
}

/// A binary name resolved through PATH, as `Command` would run it.
pub fn resolve_binary(bin: &Path) -> PathBuf {
    if bin.components().count() > 1 || bin.is_absolute() {
        return bin.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(bin)).find(|p| p.is_file()))
        .unwrap_or_else(|| bin.to_path_buf())
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(crate::rootfs::hex(ctx.finish().as_ref()))
}

/// Whether `criu_binary` (a path, or a name looked up in PATH) is the one
/// the marker at `marker_path` records, built with [`RLIMIT_PATCH`]. The
/// binary is recognised by its sha256, wherever it lies.
pub fn patch_status(criu_binary: &Path, marker_path: &Path) -> PatchStatus {
    match marker_of(criu_binary, marker_path) {
        Err(status) => status,
        Ok((binary, marker)) if marker.patches.iter().any(|p| p.name == RLIMIT_PATCH) => PatchStatus::Patched { binary },
        Ok((binary, marker)) => PatchStatus::WithoutPatch { binary, patches: marker.patches.into_iter().map(|p| p.name).collect() },
    }
}

/// The patches post-copy needs (0002-0004: lazy pages without
/// CAP_SYS_RESOURCE, over ctmigrate's socket, failing safely) and the one
/// that keeps its frozen time flat (0005).
pub const POSTCOPY_PATCHES: [&str; 4] = [
    "0002-lazy-pages-page-server-without-cap-sys-resource.patch",
    "0003-lazy-dump-page-server-socket-from-rpc.patch",
    "0004-lazy-pages-session-without-close-fails-the-dump.patch",
    "0005-lazy-dump-reads-lazy-pages-from-the-task.patch",
];

/// Of [`POSTCOPY_PATCHES`], those the CRIU in use lacks (empty: it has
/// them all); an error says why that cannot be told.
pub fn missing_postcopy_patches(criu_binary: &Path, marker_path: &Path) -> Result<Vec<&'static str>, PatchStatus> {
    let (_, marker) = marker_of(criu_binary, marker_path)?;
    Ok(POSTCOPY_PATCHES.into_iter().filter(|want| !marker.patches.iter().any(|p| p.name == *want)).collect())
}

/// The binary `criu_binary` names and the marker at `marker_path`, if the
/// marker records that very binary (by its sha256, wherever it lies).
fn marker_of(criu_binary: &Path, marker_path: &Path) -> Result<(PathBuf, BuildMarker), PatchStatus> {
    let binary = std::fs::canonicalize(resolve_binary(criu_binary)).unwrap_or_else(|_| resolve_binary(criu_binary));
    let text = match std::fs::read_to_string(marker_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PatchStatus::NoMarker { binary, marker: marker_path.to_path_buf() }),
        Err(e) => return Err(PatchStatus::Unknown { reason: format!("{}: {e}", marker_path.display()) }),
    };
    let marker: BuildMarker = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => return Err(PatchStatus::Unknown { reason: format!("{}: {e}", marker_path.display()) }),
    };
    let sum = match sha256_file(&binary) {
        Ok(s) => s,
        Err(e) => return Err(PatchStatus::Unknown { reason: format!("{}: {e}", binary.display()) }),
    };
    if !sum.eq_ignore_ascii_case(marker.sha256.trim()) {
        return Err(PatchStatus::OtherBinary { binary, recorded: marker.binary });
    }
    Ok((binary, marker))
}

/// Both answers, for `check` and the sender's preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlimitSupport {
    pub cap_sys_resource: bool,
    pub patch: PatchStatus,
}

impl RlimitSupport {
    /// This process's capabilities and the default marker.
    pub fn detect(criu_binary: &Path) -> Self {
        RlimitSupport { cap_sys_resource: has_cap_sys_resource(), patch: patch_status(criu_binary, Path::new(DEFAULT_MARKER)) }
    }

    /// Whether CRIU can dump tasks of users other than root.
    pub fn dumps_other_users(&self) -> bool {
        self.cap_sys_resource || self.patch.is_patched()
    }
}

/// A task's identity, as the host sees it (`/proc/PID/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCreds {
    pub pid: i32,
    pub command: String,
    /// Real, effective, saved.
    pub uids: [u32; 3],
    /// Real, effective, saved.
    pub gids: [u32; 3],
}

impl TaskCreds {
    /// The identity in task `pid`'s status.
    pub fn from_status(pid: i32, status: &Status) -> Self {
        TaskCreds {
            pid,
            command: status.name.clone(),
            uids: [status.ruid, status.euid, status.suid],
            gids: [status.rgid, status.egid, status.sgid],
        }
    }

    /// Reads `/proc/PID/status`; `None` if the task is gone.
    pub fn of(pid: i32) -> Option<Self> {
        Some(TaskCreds::from_status(pid, &container_runtime::procinfo::status(pid)?))
    }

    /// Whether prlimit() from root (uid 0, gid 0) needs CAP_SYS_RESOURCE
    /// for this task: any of its uids or gids is not 0 (the kernel's
    /// check_prlimit_permission compares all six).
    pub fn needs_cap_sys_resource(&self) -> bool {
        self.uids.iter().chain(self.gids.iter()).any(|&id| id != 0)
    }

    /// The first id that is not 0, for messages: `uid 65534` or `gid 33`.
    fn foreign_id(&self) -> String {
        match self.uids.iter().find(|&&u| u != 0) {
            Some(u) => format!("uid {u}"),
            None => format!("gid {}", self.gids.iter().find(|&&g| g != 0).copied().unwrap_or(0)),
        }
    }
}

/// The sender's preflight decision: `Some(message)` when CRIU cannot dump
/// one of `tasks` here (no `CAP_SYS_RESOURCE`, CRIU without the patch,
/// a task not all root), naming that task and what to do.
pub fn refusal(support: &RlimitSupport, tasks: &[TaskCreds]) -> Option<String> {
    if support.dumps_other_users() {
        return None;
    }
    let task = tasks.iter().find(|t| t.needs_cap_sys_resource())?;
    Some(format!(
        "cannot dump task {} ({}, {}): this host lacks CAP_SYS_RESOURCE and {}, so CRIU cannot read the limits of a \
         non-root task (\"Can't get rlimit\"); run ./install.sh to build CRIU with ctmigrate's rlimit patch",
        task.pid,
        task.foreign_id(),
        task.command,
        support.patch.describe()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A captured status file (root's, below) with some of its fields
    /// given other values, or left out (`None`).
    fn status_text(changes: &[(&str, Option<&str>)]) -> String {
        let mut text = String::new();
        for line in REAL_STATUS_ROOT.lines() {
            let key = line.split(':').next().unwrap_or_default();
            match changes.iter().find(|(k, _)| *k == key) {
                Some((_, Some(value))) => text.push_str(&format!("{key}:\t{value}\n")),
                Some((_, None)) => {}
                None => text.push_str(&format!("{line}\n")),
            }
        }
        text
    }

    /// procfs's reading of a status text.
    fn status(text: &str) -> Option<Status> {
        <Status as container_runtime::procinfo::FromBufRead>::from_buf_read(text.as_bytes()).ok()
    }

    fn creds(pid: i32, text: &str) -> Option<TaskCreds> {
        status(text).map(|s| TaskCreds::from_status(pid, &s))
    }

    fn has_sys_resource(text: &str) -> bool {
        status(text).is_some_and(|s| status_has_cap_sys_resource(&s))
    }

    /// /proc/self/status of root on a host whose bounding set lacks
    /// CAP_SYS_RESOURCE (bit 24).
    fn status_no_sys_resource() -> String {
        status_text(&[("Name", Some("cat")), ("CapEff", Some("000001fffeffffff")), ("CapBnd", Some("000001fffeffffff"))])
    }
    fn status_full_root() -> String {
        let all = Some("000001ffffffffff");
        status_text(&[("Name", Some("bash")), ("CapPrm", all), ("CapEff", all), ("CapBnd", all)])
    }
    /// A postgres backend: uid and gid 104 throughout.
    fn status_postgres() -> String {
        let (ids, none) = (Some("104\t104\t104\t104"), Some("0000000000000000"));
        let gids = Some("111\t111\t111\t111");
        status_text(&[("Name", Some("postgres")), ("Uid", ids), ("Gid", gids), ("Groups", Some("111 ")), ("CapPrm", none), ("CapEff", none)])
    }
    /// A task that dropped only its effective uid (seteuid).
    fn status_seteuid() -> String {
        status_text(&[("Name", Some("worker")), ("Uid", Some("0\t33\t0\t33"))])
    }
    fn status_root_gid_data() -> String {
        status_text(&[("Name", Some("sg-task")), ("Gid", Some("0\t0\t33\t0"))])
    }

    fn marker_json(sum: &str, patches: &[&str]) -> String {
        let patches: Vec<String> =
            patches.iter().map(|p| format!("{{\"name\": \"{p}\", \"sha256\": \"{}\"}}", "ab".repeat(32))).collect();
        // As install.sh writes it: one key a line.
        format!(
            "{{\n  \"binary\": \"/usr/local/sbin/criu\",\n  \"sha256\": \"{sum}\",\n  \"version\": \"4.2.1\",\n  \
             \"source\": \"criu_4.2.1.orig.tar.xz\",\n  \"patches\": [{}],\n  \"built_at\": \"2026-11-30T15:00:00Z\"\n}}\n",
            patches.join(", ")
        )
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("criu"), b"#!/bin/sh\necho pretend criu\n").unwrap();
            Fixture { dir }
        }
        fn binary(&self) -> PathBuf {
            self.dir.path().join("criu")
        }
        fn marker(&self) -> PathBuf {
            self.dir.path().join("criu-build.json")
        }
        fn write_marker(&self, sum: &str, patches: &[&str]) {
            std::fs::write(self.marker(), marker_json(sum, patches)).unwrap();
        }
        fn sum(&self) -> String {
            sha256_file(&self.binary()).unwrap()
        }
    }

    /// Captured on the project's machine: root's and nobody's
    /// /proc/self/status, and the marker install.sh wrote.
    const REAL_STATUS_ROOT: &str = include_str!("../testdata/status-root-without-sys-resource");
    const REAL_STATUS_NOBODY: &str = include_str!("../testdata/status-nobody");
    const REAL_MARKER: &str = include_str!("../testdata/criu-build.json");

    #[test]
    fn captured_status_files() {
        assert!(!has_sys_resource(REAL_STATUS_ROOT), "bit 24 is clear on the project's machines");
        let root = creds(1, REAL_STATUS_ROOT).unwrap();
        assert!(!root.needs_cap_sys_resource());
        let nobody = creds(2, REAL_STATUS_NOBODY).unwrap();
        assert_eq!((nobody.uids, nobody.gids, nobody.command.as_str()), ([65534; 3], [65534; 3], "cat"));
        assert!(nobody.needs_cap_sys_resource());
    }

    #[test]
    fn the_marker_install_sh_writes_parses() {
        let m: BuildMarker = serde_json::from_str(REAL_MARKER).unwrap();
        assert_eq!(m.binary, Path::new("/usr/local/sbin/criu"));
        assert_eq!(m.sha256.len(), 64);
        assert_eq!(m.version.as_deref(), Some("4.2.1"));
        assert_eq!(m.patches.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), [RLIMIT_PATCH]);
        // The patch it names is the repository's.
        let repo_patch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../criu-patches").join(RLIMIT_PATCH);
        assert!(repo_patch.is_file(), "{} missing", repo_patch.display());
        // A marker naming this binary's digest (the rest as install.sh wrote it).
        let fx = Fixture::new();
        std::fs::write(fx.marker(), REAL_MARKER.replace(&m.sha256, &fx.sum())).unwrap();
        assert!(patch_status(&fx.binary(), &fx.marker()).is_patched());
    }

    #[test]
    fn postcopy_patches_are_the_repositorys_and_found_in_the_marker() {
        for name in POSTCOPY_PATCHES {
            let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../criu-patches").join(name);
            assert!(file.is_file(), "{} missing", file.display());
        }
        let m: BuildMarker = serde_json::from_str(REAL_MARKER).unwrap();
        let fx = Fixture::new();
        std::fs::write(fx.marker(), REAL_MARKER.replace(&m.sha256, &fx.sum())).unwrap();
        assert_eq!(missing_postcopy_patches(&fx.binary(), &fx.marker()).unwrap(), POSTCOPY_PATCHES);
        let mut all = m.clone();
        all.sha256 = fx.sum();
        all.patches.extend(POSTCOPY_PATCHES.iter().map(|name| MarkerPatch { name: name.to_string(), sha256: None }));
        std::fs::write(fx.marker(), serde_json::to_string(&all).unwrap()).unwrap();
        assert!(missing_postcopy_patches(&fx.binary(), &fx.marker()).unwrap().is_empty());
        std::fs::remove_file(fx.marker()).unwrap();
        assert!(matches!(missing_postcopy_patches(&fx.binary(), &fx.marker()), Err(PatchStatus::NoMarker { .. })));
    }

    #[test]
    fn sha256_of_a_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("abc");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(sha256_file(&f).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn capability_from_status() {
        assert_eq!(status(&status_no_sys_resource()).map(|s| s.capeff), Some(0x1fffeffffff));
        assert!(!has_sys_resource(&status_no_sys_resource()));
        assert!(has_sys_resource(&status_full_root()));
        assert!(!has_sys_resource(&status_postgres()));
        assert!(!has_sys_resource(&status_text(&[("CapEff", None)])), "no CapEff line: assume the capability is missing");
        assert!(!has_sys_resource(&status_text(&[("CapEff", Some("not-hex"))])));
        // This process: what `check` and the preflight ask.
        assert_eq!(effective_caps().map(caps_have_sys_resource), Some(has_cap_sys_resource()));
    }

    #[test]
    fn marker_naming_this_binary_and_the_patch_means_patched() {
        let fx = Fixture::new();
        fx.write_marker(&fx.sum(), &[RLIMIT_PATCH]);
        let status = patch_status(&fx.binary(), &fx.marker());
        assert!(status.is_patched(), "{status:?}");
        // Upper-case hex is the same digest.
        fx.write_marker(&fx.sum().to_uppercase(), &["0000-other.patch", RLIMIT_PATCH]);
        assert!(patch_status(&fx.binary(), &fx.marker()).is_patched());
    }

    #[test]
    fn no_marker_means_not_patched() {
        let fx = Fixture::new();
        let status = patch_status(&fx.binary(), &fx.marker());
        assert!(matches!(status, PatchStatus::NoMarker { .. }), "{status:?}");
        assert!(status.describe().contains("criu-build.json"), "{}", status.describe());
    }

    #[test]
    fn marker_of_another_binary_means_not_patched() {
        let fx = Fixture::new();
        fx.write_marker(&"0".repeat(64), &[RLIMIT_PATCH]);
        let status = patch_status(&fx.binary(), &fx.marker());
        assert!(matches!(status, PatchStatus::OtherBinary { .. }), "{status:?}");
        // The binary changed after the marker was written (a reinstall by hand).
        fx.write_marker(&fx.sum(), &[RLIMIT_PATCH]);
        std::fs::write(fx.binary(), b"another criu").unwrap();
        assert!(!patch_status(&fx.binary(), &fx.marker()).is_patched());
    }

    #[test]
    fn marker_without_the_patch_means_not_patched() {
        let fx = Fixture::new();
        fx.write_marker(&fx.sum(), &[]);
        let status = patch_status(&fx.binary(), &fx.marker());
        assert_eq!(status, PatchStatus::WithoutPatch { binary: std::fs::canonicalize(fx.binary()).unwrap(), patches: vec![] });
        fx.write_marker(&fx.sum(), &["0002-something-else.patch"]);
        assert!(matches!(patch_status(&fx.binary(), &fx.marker()), PatchStatus::WithoutPatch { .. }));
    }

    #[test]
    fn broken_marker_or_missing_binary_is_unknown() {
        let fx = Fixture::new();
        std::fs::write(fx.marker(), "{\"binary\": ").unwrap();
        assert!(matches!(patch_status(&fx.binary(), &fx.marker()), PatchStatus::Unknown { .. }));
        fx.write_marker(&fx.sum(), &[RLIMIT_PATCH]);
        let gone = fx.dir.path().join("no-such-criu");
        assert!(matches!(patch_status(&gone, &fx.marker()), PatchStatus::Unknown { .. }));
    }

    #[test]
    fn a_binary_found_through_a_symlink_is_the_same_binary() {
        let fx = Fixture::new();
        fx.write_marker(&fx.sum(), &[RLIMIT_PATCH]);
        let link = fx.dir.path().join("criu-link");
        std::os::unix::fs::symlink(fx.binary(), &link).unwrap();
        assert!(patch_status(&link, &fx.marker()).is_patched());
    }

    #[test]
    fn task_creds_from_status() {
        let pg = creds(31337, &status_postgres()).unwrap();
        assert_eq!(pg, TaskCreds { pid: 31337, command: "postgres".into(), uids: [104; 3], gids: [111; 3] });
        assert!(pg.needs_cap_sys_resource());
        assert!(!creds(1, &status_full_root()).unwrap().needs_cap_sys_resource());
        assert!(creds(2, &status_seteuid()).unwrap().needs_cap_sys_resource());
        assert!(creds(3, &status_root_gid_data()).unwrap().needs_cap_sys_resource());
        assert_eq!(creds(4, &status_text(&[("Name", Some("x")), ("Uid", Some("0\t0"))])), None, "a short Uid line");
        // A task that is gone has none.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id() as i32;
        child.wait().unwrap();
        assert_eq!(TaskCreds::of(gone), None);
        assert_eq!(TaskCreds::of(std::process::id() as i32).map(|c| c.pid), Some(std::process::id() as i32));
    }

    fn support(cap: bool, patched: bool) -> RlimitSupport {
        RlimitSupport {
            cap_sys_resource: cap,
            patch: if patched {
                PatchStatus::Patched { binary: "/usr/local/sbin/criu".into() }
            } else {
                PatchStatus::NoMarker { binary: "/usr/sbin/criu".into(), marker: DEFAULT_MARKER.into() }
            },
        }
    }

    #[test]
    fn refused_only_without_capability_and_patch_and_with_a_non_root_task() {
        let root = creds(10, &status_full_root()).unwrap();
        let pg = creds(31337, &status_postgres()).unwrap();
        let both = [root.clone(), pg];
        assert_eq!(refusal(&support(true, false), &both), None, "CAP_SYS_RESOURCE: prlimit works");
        assert_eq!(refusal(&support(false, true), &both), None, "the patched CRIU reads /proc/PID/limits");
        assert_eq!(refusal(&support(true, true), &both), None);
        assert_eq!(refusal(&support(false, false), std::slice::from_ref(&root)), None, "only root tasks");
        assert_eq!(refusal(&support(false, false), &[]), None);
        let msg = refusal(&support(false, false), &both).expect("refused");
        assert!(msg.contains("task 31337 (uid 104, postgres)"), "{msg}");
        assert!(msg.contains("CAP_SYS_RESOURCE"), "{msg}");
        assert!(msg.contains("install.sh"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn refusal_names_a_gid_when_the_uids_are_root() {
        let t = creds(7, &status_root_gid_data()).unwrap();
        let msg = refusal(&support(false, false), &[t]).unwrap();
        assert!(msg.contains("task 7 (gid 33, sg-task)"), "{msg}");
    }
}
