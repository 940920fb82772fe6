//! The source's sequence without root, CRIU or runc: a [`Migration`] runs
//! against a recording fake of its host ([`FakeHost`]: its "CRIU" sends
//! known pages over the page-server socket, as the real one does) and a
//! scripted destination on loopback that speaks the protocol. Each test
//! checks what was done to the source (frozen, thawed, removed) for one
//! way the destination answers, and what the destination received.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use migration_protocol::{ErrorCode, ImageData, ImagesDone, PROTOCOL_VERSION_MAX};

use super::preflight::{agree, Inspected};
use super::*;

/// What the fake host was asked to do, in order.
type Calls = Arc<Mutex<Vec<String>>>;

/// The pages the fake CRIU dumps: two 4 KiB pages of a known pattern.
fn dumped_pages() -> Vec<u8> {
    (0..8192u32).map(|i| (i % 251) as u8).collect()
}

struct FakeHost {
    calls: Calls,
    freeze_fails: bool,
    criu_fails: bool,
}

impl FakeHost {
    fn record(&self, call: &str) {
        self.calls.lock().unwrap().push(call.to_string());
    }
}

impl SourceHost for FakeHost {
    fn freeze(&mut self, _: &container_runtime::Freezer, _: Duration) -> Result<(), MigrationError> {
        self.record("freeze");
        if self.freeze_fails {
            return Err(MigrationError::Other("the cgroup did not freeze".into()));
        }
        Ok(())
    }

    fn lock_network(&mut self, _: &container_network::Netns) -> Result<(), MigrationError> {
        self.record("lock-network");
        Ok(())
    }

    fn unlock_network(&mut self, _: &container_network::Netns) -> Result<(), MigrationError> {
        self.record("unlock-network");
        Ok(())
    }

    fn start_dump(&mut self, dump: DumpOptions, page_server: Option<std::os::fd::OwnedFd>, _post_dump: Option<std::sync::mpsc::Sender<()>>) -> Result<CriuRun, MigrationError> {
        self.record(if dump.pre_dump { "pre-dump" } else { "dump" });
        let fails = self.criu_fails;
        let worker = std::thread::spawn(move || -> Result<u64, criu_bindings::CriuError> {
            // What CRIU writes itself, beside the pages it relays.
            std::fs::write(dump.images_dir.join("inventory.img"), b"fake inventory")?;
            if let Some(fd) = page_server {
                let mut criu = criu_bindings::page_server::PageServerClient::new(std::os::unix::net::UnixStream::from(fd));
                criu.open_task(1)?;
                criu.send_pages(0x10000, &dumped_pages())?;
                criu.close()?;
            }
            if fails {
                return Err(std::io::Error::other("the fake CRIU failed").into());
            }
            Ok(1)
        });
        Ok(CriuRun { pid: None, worker })
    }

    fn spawn_guard(&mut self, _: &container_runtime::Freezer, _: &Path, _: &Path) -> Result<Option<FreezeGuard>, MigrationError> {
        Ok(None)
    }

    fn thaw(&mut self, _: &SourcePlan, _: &str) -> Result<(), MigrationError> {
        self.record("thaw");
        Ok(())
    }

    fn remove(&mut self, _: &SourcePlan, _: &str) -> Vec<String> {
        self.record("remove");
        Vec::new()
    }
}

/// How the scripted destination answers once the final images are in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    /// Ready, then CommitAck to the Commit.
    Ready,
    /// Ready; the Commit arrives but its acknowledgement is lost.
    ReadyAckLost,
    /// An Error message: the restore failed.
    RestoreFailed,
    /// Hangs up without a word.
    HangUp,
}

/// What the scripted destination saw.
#[derive(Default, Debug)]
struct Received {
    images: BTreeMap<String, Vec<u8>>,
    rootfs_paths: Vec<String>,
    committed: bool,
    aborted: bool,
}

/// The destination's Commit is recorded among the host's calls, so that
/// the tests see it between what was done to the source.
fn destination(listener: TcpListener, answer: Answer, calls: Calls) -> std::thread::JoinHandle<Received> {
    std::thread::spawn(move || {
        let mut got = Received::default();
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = FrameReader::new(stream.try_clone().unwrap());
        let mut writer = FrameWriter::new(stream.try_clone().unwrap());
        reader.read_frame().unwrap().expect(MessageKind::Hello, "Hello").unwrap();
        writer.write_json(MessageKind::HelloAck, &HelloAck { version: PROTOCOL_VERSION_MAX, software: "scripted".into() }).unwrap();
        writer.flush().unwrap();
        let manifest: Manifest = reader.read_frame().unwrap().expect(MessageKind::Manifest, "Manifest").unwrap().json().unwrap();
        assert_eq!(manifest.container_id, "web");
        writer.write_json(MessageKind::ManifestAccepted, &ManifestAccepted { bundle: "/nowhere".into() }).unwrap();
        writer.flush().unwrap();
        loop {
            let Ok(frame) = reader.read_frame() else { return got };
            match frame.kind {
                MessageKind::RootfsEntry => {
                    let e: migration_protocol::rootfs::EntryRecord = prost::Message::decode(&frame.payload[..]).unwrap();
                    got.rootfs_paths.push(String::from_utf8_lossy(&e.path).into_owned());
                }
                MessageKind::ImageData => {
                    let chunk = ImageData::decode(&frame.payload).unwrap();
                    let file = got.images.entry(chunk.name.to_string()).or_default();
                    let end = chunk.offset as usize + chunk.data.len();
                    file.resize(file.len().max(end), 0);
                    file[chunk.offset as usize..end].copy_from_slice(chunk.data);
                }
                MessageKind::ImagesDone => {
                    let done: ImagesDone = frame.json().unwrap();
                    for f in &done.files {
                        assert_eq!(got.images.get(&f.name).map(|d| d.len() as u64).unwrap_or(0), f.size, "{}", f.name);
                    }
                    break;
                }
                MessageKind::Abort => {
                    got.aborted = true;
                    return got;
                }
                _ => {}
            }
        }
        match answer {
            Answer::HangUp => return got,
            Answer::RestoreFailed => {
                let e = ErrorMessage { code: ErrorCode::RestoreFailed, message: "restore on the destination failed: scripted".into() };
                writer.write_json(MessageKind::Error, &e).unwrap();
                writer.flush().unwrap();
            }
            Answer::Ready | Answer::ReadyAckLost => {
                writer.write_json(MessageKind::Ready, &Ready { pid: 4242, restore_ms: 1 }).unwrap();
                writer.flush().unwrap();
            }
        }
        while let Ok(frame) = reader.read_frame() {
            match frame.kind {
                MessageKind::Commit => {
                    got.committed = true;
                    calls.lock().unwrap().push("destination-committed".into());
                    if answer == Answer::ReadyAckLost {
                        return got;
                    }
                    writer.write_frame(MessageKind::CommitAck, b"").unwrap();
                    writer.flush().unwrap();
                }
                MessageKind::Abort => got.aborted = true,
                _ => {}
            }
        }
        got
    })
}

/// The fake's calls, the migration's result (exit code on failure), the
/// journal's last state for it, and what the destination received.
struct Run {
    calls: Vec<String>,
    exit: Result<(), i32>,
    journal_state: String,
    received: Received,
    /// The sender's metrics after the run (its result event is `send`'s,
    /// not emitted here: the migration is still in flight).
    metrics: crate::metrics::exposition::Exposition,
}

impl Run {
    fn metric(&self, name: &str) -> f64 {
        self.metrics.value(name, &[("role", "sender")]).unwrap_or_else(|| panic!("no {name}"))
    }
}

fn migrate(answer: Answer, freeze_fails: bool, criu_fails: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/hostname"), b"web\n").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let calls: Calls = Default::default();
    let dest = destination(listener, answer, calls.clone());
    let opts = SendOptions {
        container: "web".into(),
        to: Destination::Tcp { host: "127.0.0.1".into(), port },
        runtime_root: dir.path().join("runc"),
        dest_id: None,
        compression: CompressionMode::Never,
        work_root: dir.path().join("work"),
        runc_binary: "runc-not-used".into(),
        criu_binary: "criu-not-used".into(),
        io_timeout: Duration::from_secs(10),
        restore_timeout: Duration::from_secs(10),
        freeze_timeout: Duration::from_secs(1),
        guard_exe: "guard-not-used".into(),
        mode: ModeRequest::StopCopy,
        max_iterations: 1,
        downtime_target: Duration::from_millis(300),
        security: Security::Insecure,
        audit_log: dir.path().join("audit.log"),
        bwlimit: None,
        ssh_options: Vec::new(),
        remote_command: String::new(),
        tcp_established: false,
        stage_images: crate::scratch::StageMode::Disk,
        journal_dir: dir.path().join("journal"),
        in_doubt_timeout: Duration::from_secs(1),
        allow_postcopy: false,
        postcopy_lease: Duration::from_secs(4),
        pod: None,
        freeze_slots: None,
    };
    let freezer = container_runtime::Freezer { path: dir.path().join("cgroup"), version: container_runtime::cgroup::CgroupVersion::V2 };
    let found = Inspected {
        state: RuncState { id: "web".into(), pid: 1, status: "running".into(), bundle: dir.path().to_path_buf(), rootfs: rootfs.clone() },
        plan: DumpPlan {
            pid: 1,
            root: rootfs,
            ext_mounts: Vec::new(),
            external_namespaces: Vec::new(),
            freezer,
            descriptors_json: b"[]".to_vec(),
            netns_path: None,
            empty_tmpfs: Vec::new(),
        },
        config: serde_json::json!({"ociVersion": "1.0.2"}),
        criu_version: "4.2.1".into(),
        mode: Mode::StopCopy,
        mode_reason: None,
        network: None,
        network_handling: None,
        memory_bytes: 1 << 20,
        hidden_mounts: Default::default(),
    };
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(crate::metrics::Role::Sender));
    let rep = Reporter::with_mode(crate::events::ReportMode::Quiet).with_metrics(metrics.clone());
    let host = FakeHost { calls: calls.clone(), freeze_fails, criu_fails };
    let prepared = agree(&opts, "web", found, &rep).unwrap();
    let id = prepared.migration_id.clone();
    let mut result = ResultEvent::default();
    let exit = Migration::new(&opts, prepared, &rep, Box::new(host)).run(&mut result).map_err(|f| f.outcome.exit_code());
    let received = dest.join().unwrap();
    let entry = Journal::new(&opts.journal_dir).load(Role::Source, &id).unwrap().expect("journalled");
    let journal_state = match entry.side {
        Side::Source { state, .. } => format!("{state:?}"),
        Side::Destination { .. } => unreachable!("a source entry"),
    };
    assert!(!opts.work_root.join(format!("send-web-{}", std::process::id())).exists(), "the work directory stayed");
    let calls = calls.lock().unwrap().clone();
    let metrics = crate::metrics::exposition::parse(&metrics.render().unwrap()).unwrap();
    Run { calls, exit, journal_state, received, metrics }
}

#[test]
fn a_migration_freezes_dumps_commits_and_only_then_removes_the_source() {
    let run = migrate(Answer::Ready, false, false);
    assert_eq!(run.exit, Ok(()));
    assert_eq!(run.calls, ["freeze", "dump", "destination-committed", "remove"]);
    assert_eq!(run.journal_state, "Migrated");
    // The pages CRIU relayed arrive as the pages image its pagemap names,
    // beside what CRIU wrote itself; the rootfs went first.
    let pages = format!("pages-{}.img", criu_bindings::page_server::RELAYED_PAGES_ID_BASE);
    assert_eq!(run.received.images.get(&pages), Some(&dumped_pages()), "{:?}", run.received.images.keys());
    assert!(run.received.images.contains_key("pagemap-1.img"));
    assert_eq!(run.received.images.get("inventory.img").map(Vec::as_slice), Some(&b"fake inventory"[..]));
    assert!(run.received.rootfs_paths.iter().any(|p| p == "etc/hostname"), "{:?}", run.received.rootfs_paths);
    assert_eq!(run.metric("ctmigrate_migrations_in_flight"), 1.0);
    assert_eq!(run.metric("ctmigrate_rollbacks_total"), 0.0);
    assert_eq!(run.metric("ctmigrate_migrations_in_doubt"), 0.0);
}

#[test]
fn a_failed_restore_thaws_the_source_and_never_removes_it() {
    let run = migrate(Answer::RestoreFailed, false, false);
    assert_eq!(run.exit, Err(Outcome::SourceResumed.exit_code()));
    assert_eq!(run.calls, ["freeze", "dump", "thaw"]);
    assert_eq!(run.journal_state, "Resumed");
    assert!(!run.received.committed);
    assert_eq!(run.metric("ctmigrate_rollbacks_total"), 1.0);
}

#[test]
fn a_destination_gone_before_ready_thaws_the_source() {
    let run = migrate(Answer::HangUp, false, false);
    assert_eq!(run.exit, Err(Outcome::SourceResumed.exit_code()));
    assert_eq!(run.calls, ["freeze", "dump", "thaw"]);
    assert!(!run.received.committed);
}

#[test]
fn a_failed_dump_thaws_the_source_and_tells_the_destination() {
    let run = migrate(Answer::Ready, false, true);
    assert_eq!(run.exit, Err(Outcome::SourceResumed.exit_code()));
    assert_eq!(run.calls, ["freeze", "dump", "thaw"]);
    assert!(run.received.aborted, "the destination was not told to abort");
    assert!(!run.received.committed);
}

#[test]
fn a_cgroup_that_does_not_freeze_leaves_the_source_untouched() {
    let run = migrate(Answer::Ready, true, false);
    assert_eq!(run.exit, Err(Outcome::NothingTouched.exit_code()));
    assert_eq!(run.calls, ["freeze"]);
    assert_eq!(run.journal_state, "Untouched");
    assert!(run.received.aborted);
}

#[test]
fn a_lost_commit_acknowledgement_leaves_the_source_frozen_never_thawed_or_removed() {
    // The destination committed, then went silent (and cannot be asked):
    // thawing would make two copies, removing might leave none.
    let run = migrate(Answer::ReadyAckLost, false, false);
    assert_eq!(run.exit, Err(Outcome::Uncertain.exit_code()));
    assert_eq!(run.calls, ["freeze", "dump", "destination-committed"]);
    assert_eq!(run.journal_state, "LeftInDoubt");
    // Given up on: still in doubt (until the process exits), not rolled back.
    assert_eq!(run.metric("ctmigrate_migrations_in_doubt"), 1.0);
    assert_eq!(run.metric("ctmigrate_rollbacks_total"), 0.0);
}
