//! The migration journal: a small durable record, on each host, of each
//! migration's last decided state, so that a side that crashed or lost its
//! peer can tell what it must do with its copy.
//!
//! One file per migration and side, `<dir>/<role>-<migration id>`:
//!
//! ```text
//! ctmigrate-journal 1 <CRC-32C of the body, 8 hex digits>\n
//! <body: one JSON object, an Entry>
//! ```
//!
//! A file is replaced whole (written beside, fsynced, renamed over, and the
//! directory fsynced), so a crash leaves the old record or the new one,
//! never a mix. A state is journalled *before* the act it allows: the
//! source writes `commit-sent` before it sends Commit, the destination
//! `committed` before it lets its copy run. What the record then says is
//! the most that can have happened.
//!
//! Entries in an end state are kept (the newest [`KEEP_FINISHED`]) so that
//! a source asking late still gets its answer.

use std::io::Write;
use std::path::{Path, PathBuf};

use migration_protocol::{DestinationState, SourceState};
use serde::{Deserialize, Serialize};

/// Where journals live unless `--journal-dir` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/ctmigrate/journal";
const MAGIC: &str = "ctmigrate-journal";
const VERSION: u32 = 1;
/// Finished entries kept per directory.
pub const KEEP_FINISHED: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} is damaged ({why}): move it aside and settle the migration with `ctmigrate resolve`")]
    Damaged { path: PathBuf, why: String },
    #[error("no migration {id} in the journal {dir}: `ctmigrate status --all --journal-dir {dir}` lists them")]
    NotFound { id: String, dir: PathBuf },
}

/// Which copy of the container this host holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// What the source host needs to settle its copy without the sender that
/// started the migration (from its freeze guard, or `ctmigrate resolve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourcePlan {
    pub runtime_root: PathBuf,
    pub runc_binary: PathBuf,
    /// The frozen cgroup (v1 freezer directory or v2 cgroup).
    pub freezer_path: PathBuf,
    pub cgroup_version: u8,
    pub init_pid: i32,
    /// The container's network namespace when ctmigrate moves it, locked
    /// while frozen.
    pub netns: Option<PathBuf>,
    pub network: Option<container_network::NetworkRecord>,
    /// The namespace is a named one that goes with the container.
    pub remove_netns: bool,
    /// The destination, as given to `send --to`.
    pub destination: String,
    /// `None`: --insecure (or ssh, which brings its own security).
    pub tls_dir: Option<PathBuf>,
    pub ssh_options: Vec<String>,
    pub remote_command: String,
    /// How long one question to the destination may take.
    pub io_timeout_ms: u64,
    /// How long to keep asking when in doubt.
    pub in_doubt_timeout_ms: u64,
    /// Post-copy's lease: a source settled after the destination's copy
    /// was let run waits this (and the margin) before it thaws.
    #[serde(default)]
    pub postcopy_lease_ms: u64,
}

/// What the destination host needs to finish or undo its copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationPlan {
    pub runtime_root: PathBuf,
    pub runc_binary: PathBuf,
    pub bundle: PathBuf,
    pub work_dir: PathBuf,
    pub network: Option<container_network::NetworkRecord>,
    /// The pod this container arrived in, if any: once the pod is
    /// committed ([`Journal::pod_committed`]) this copy is committed too,
    /// even if its own Commit never came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case")]
pub enum Side {
    Source { state: SourceState, plan: SourcePlan },
    Destination { state: DestinationState, plan: DestinationPlan },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub container: String,
    pub dest_id: String,
    /// The other host, as this one knows it.
    pub peer: String,
    /// The process that acts on this migration now; another process acts
    /// on it only once this one is gone.
    pub owner_pid: u32,
    /// A process acting for the owner if it dies (the sender's freeze
    /// guard): while it lives, nothing else acts on the migration either.
    #[serde(default)]
    pub helper_pid: Option<u32>,
    /// Every state journalled, with its time (Unix ms).
    pub history: Vec<(String, u64)>,
    #[serde(flatten)]
    pub side: Side,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn state_name<T: Serialize>(state: &T) -> String {
    serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "?".into())
}

impl Entry {
    pub fn new(id: &str, container: &str, dest_id: &str, peer: &str, side: Side) -> Self {
        let mut e = Entry {
            id: id.into(),
            container: container.into(),
            dest_id: dest_id.into(),
            peer: peer.into(),
            owner_pid: std::process::id(),
            helper_pid: None,
            history: Vec::new(),
            side,
        };
        let name = e.state_name();
        e.history.push((name, now_ms()));
        e
    }

    pub fn role(&self) -> Role {
        match self.side {
            Side::Source { .. } => Role::Source,
            Side::Destination { .. } => Role::Destination,
        }
    }

    pub fn state_name(&self) -> String {
        match &self.side {
            Side::Source { state, .. } => state_name(state),
            Side::Destination { state, .. } => state_name(state),
        }
    }

    pub fn set_source_state(&mut self, new: SourceState) {
        if let Side::Source { state, .. } = &mut self.side {
            *state = new;
        }
        self.history.push((state_name(&new), now_ms()));
    }

    pub fn set_destination_state(&mut self, new: DestinationState) {
        if let Side::Destination { state, .. } = &mut self.side {
            *state = new;
        }
        self.history.push((state_name(&new), now_ms()));
    }

    /// Nothing is left to do for this migration on this host.
    pub fn is_finished(&self) -> bool {
        match &self.side {
            Side::Source { state, .. } => matches!(
                state,
                SourceState::Migrated | SourceState::Untouched | SourceState::Resumed | SourceState::NotResumed
            ),
            Side::Destination { state, .. } => state.is_final(),
        }
    }

    /// Whether the process that owns the entry, or its helper, is still
    /// at it.
    pub fn owner_alive(&self) -> bool {
        let alive = |pid: u32| pid == std::process::id() || is_ctmigrate_process(pid);
        alive(self.owner_pid) || self.helper_pid.is_some_and(|p| p != std::process::id() && alive(p))
    }

    /// When the last state was journalled (Unix ms).
    pub fn updated_ms(&self) -> u64 {
        self.history.last().map(|(_, t)| *t).unwrap_or(0)
    }
}

/// One host's journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, role: Role, id: &str) -> PathBuf {
        self.dir.join(format!("{}-{id}", role.name()))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::Io { path: path.to_path_buf(), source }
    }

    /// Writes `entry` durably, replacing its previous record.
    pub fn write(&self, entry: &Entry) -> Result<(), JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(Self::io(&self.dir))?;
        let path = self.path_of(entry.role(), &entry.id);
        let body = serde_json::to_vec_pretty(entry).expect("journal entries serialize");
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut file = std::fs::File::create(&tmp).map_err(Self::io(&tmp))?;
        writeln!(file, "{MAGIC} {VERSION} {:08x}", crc32c::crc32c(&body)).map_err(Self::io(&tmp))?;
        file.write_all(&body).map_err(Self::io(&tmp))?;
        file.sync_all().map_err(Self::io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(Self::io(&path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(Self::io(&self.dir))?;
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Entry, JournalError> {
        let bytes = std::fs::read(path).map_err(Self::io(path))?;
        let damaged = |why: &str| JournalError::Damaged { path: path.to_path_buf(), why: why.into() };
        let nl = bytes.iter().position(|b| *b == b'\n').ok_or_else(|| damaged("no header line"))?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| damaged("header is not text"))?;
        let mut words = header.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(damaged("not a ctmigrate journal"));
        }
        let version: u32 = words.next().and_then(|v| v.parse().ok()).ok_or_else(|| damaged("no version"))?;
        if version != VERSION {
            return Err(damaged(&format!("version {version}; this build reads version {VERSION}")));
        }
        let crc = words.next().and_then(|c| u32::from_str_radix(c, 16).ok()).ok_or_else(|| damaged("no checksum"))?;
        let body = &bytes[nl + 1..];
        if crc32c::crc32c(body) != crc {
            return Err(damaged("checksum mismatch"));
        }
        serde_json::from_slice(body).map_err(|e| damaged(&e.to_string()))
    }

    /// The entry of migration `id` on side `role`, if journalled.
    pub fn load(&self, role: Role, id: &str) -> Result<Option<Entry>, JournalError> {
        let path = self.path_of(role, id);
        if !path.exists() {
            return Ok(None);
        }
        Self::read(&path).map(Some)
    }

    /// The entry of migration `id` on whichever side this host holds.
    pub fn find(&self, id: &str) -> Result<Entry, JournalError> {
        for role in [Role::Source, Role::Destination] {
            if let Some(e) = self.load(role, id)? {
                return Ok(e);
            }
        }
        Err(JournalError::NotFound { id: id.into(), dir: self.dir.clone() })
    }

    /// Every entry, oldest update first; damaged files as errors.
    pub fn list(&self) -> Vec<Result<Entry, JournalError>> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut all: Vec<Result<Entry, JournalError>> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                (name.starts_with("source-") || name.starts_with("destination-")) && !name.contains(".tmp-")
            })
            .map(|p| Self::read(&p))
            .collect();
        all.sort_by_key(|e| e.as_ref().map(Entry::updated_ms).unwrap_or(0));
        all
    }

    /// Records, durably, that pod `pod_id` is committed (its first member's
    /// Commit came): every member's copy is the container from now on.
    pub fn mark_pod_committed(&self, pod_id: &str) -> Result<(), JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(Self::io(&self.dir))?;
        let path = self.pod_path(pod_id);
        let file = std::fs::File::create(&path).map_err(Self::io(&path))?;
        file.sync_all().map_err(Self::io(&path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(Self::io(&self.dir))
    }

    /// Whether [`mark_pod_committed`](Self::mark_pod_committed) recorded
    /// pod `pod_id`.
    pub fn pod_committed(&self, pod_id: &str) -> bool {
        self.pod_path(pod_id).exists()
    }

    fn pod_path(&self, pod_id: &str) -> PathBuf {
        self.dir.join(format!("pod-{pod_id}.committed"))
    }

    /// Removes the oldest finished entries beyond [`KEEP_FINISHED`],
    /// temporary files of writers that died, and pod commits older than a
    /// week (every member of a pod settles long before).
    pub fn prune(&self) {
        let finished: Vec<Entry> = self.list().into_iter().flatten().filter(Entry::is_finished).collect();
        for old in finished.iter().take(finished.len().saturating_sub(KEEP_FINISHED)) {
            let _ = std::fs::remove_file(self.path_of(old.role(), &old.id));
        }
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let week_old = || e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > 7 * 24 * 3600);
                if name.starts_with("pod-") && name.ends_with(".committed") && week_old() {
                    let _ = std::fs::remove_file(e.path());
                }
                if let Some(pid) = name.rsplit(".tmp-").next().filter(|_| name.contains(".tmp-")).and_then(|p| p.parse::<u32>().ok()) {
                    if !container_runtime::procinfo::exists(pid as i32) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}

/// Whether process `pid` lives and is a ctmigrate (a sender, its guard, a
/// receiver): a pid reused by another program is not.
pub fn is_ctmigrate_process(pid: u32) -> bool {
    container_runtime::procinfo::cmdline(pid as i32).is_some_and(|args| args.iter().any(|a| String::from_utf8_lossy(a).contains("ctmigrate")))
}

/// A new migration id: 16 random hex digits.
pub fn new_migration_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if bytes == [0; 8] {
        bytes = (now_ms() ^ ((std::process::id() as u64) << 40)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination_entry(id: &str) -> Entry {
        Entry::new(
            id,
            "web",
            "web",
            "tls:source.example",
            Side::Destination {
                state: DestinationState::Receiving,
                plan: DestinationPlan {
                    runtime_root: "/run/runc".into(),
                    runc_binary: "runc".into(),
                    bundle: "/b/web".into(),
                    work_dir: "/w/recv-web-1".into(),
                    network: None,
                    pod: None,
                },
            },
        )
    }

    #[test]
    fn entries_round_trip_and_keep_their_history() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path().join("j"));
        let mut e = destination_entry("0123456789abcdef");
        j.write(&e).unwrap();
        e.set_destination_state(DestinationState::ReadyStopped);
        j.write(&e).unwrap();
        let back = j.find("0123456789abcdef").unwrap();
        assert_eq!(back, e);
        assert_eq!(back.history.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["receiving", "ready-stopped"]);
        assert_eq!(back.role(), Role::Destination);
        assert!(!back.is_finished());
        assert_eq!(j.list().len(), 1, "the temporary file was renamed away");
    }

    #[test]
    fn a_damaged_entry_is_refused_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.write(&destination_entry("aa")).unwrap();
        let path = j.path_of(Role::Destination, "aa");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = j.load(Role::Destination, "aa").unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        std::fs::write(&path, b"something else\n{}").unwrap();
        assert!(j.load(Role::Destination, "aa").unwrap_err().to_string().contains("not a ctmigrate journal"));
        assert!(matches!(j.find("bb"), Err(JournalError::NotFound { .. })));
    }

    #[test]
    fn pruning_keeps_unfinished_entries_and_the_newest_finished() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        for i in 0..KEEP_FINISHED + 3 {
            let mut e = destination_entry(&format!("f{i}"));
            e.history[0].1 = i as u64;
            e.set_destination_state(DestinationState::Aborted);
            e.history[1].1 = 1000 + i as u64;
            j.write(&e).unwrap();
        }
        j.write(&destination_entry("open")).unwrap();
        j.prune();
        let left: Vec<String> = j.list().into_iter().map(|e| e.unwrap().id).collect();
        assert_eq!(left.len(), KEEP_FINISHED + 1);
        assert!(left.contains(&"open".to_string()));
        assert!(!left.contains(&"f0".to_string()) && left.contains(&format!("f{}", KEEP_FINISHED + 2)));
    }

    #[test]
    fn migration_ids_are_valid_and_differ() {
        let (a, b) = (new_migration_id(), new_migration_id());
        assert_ne!(a, b);
        migration_protocol::validate_migration_id(&a).unwrap();
    }
}
