//! The destination's sequence without root, CRIU or runc: a receiver's
//! session serves a scripted source on loopback (which sends a real rootfs
//! through the engine's own rootfs sender, and images through its image
//! streamer) against a recording fake of its host ([`FakeHost`]). Each
//! test checks what was done to the copy (restored stopped, let run,
//! removed) for one way the source or the host behaves, and what stayed
//! on disk.

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;

use migration_protocol::{Compressor, ErrorCode, RootfsPhase, PROTOCOL_VERSION_MAX};

use super::*;

/// What the fake host was asked to do, in order.
type Calls = Arc<Mutex<Vec<String>>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum HostFault {
    None,
    RestoreFails,
    /// CRIU let a task run: the fence is broken.
    TaskNotStopped,
}

struct FakeHost {
    calls: Calls,
    fault: HostFault,
}

impl FakeHost {
    fn record(&self, call: impl Into<String>) {
        self.calls.lock().unwrap().push(call.into());
    }
}

impl DestinationHost for FakeHost {
    fn exists(&self, _: &str) -> Result<bool, MigrationError> {
        Ok(false)
    }

    fn build_network(&self, record: &NetworkRecord, _: &str, _: Option<&str>) -> Result<(), MigrationError> {
        self.record(format!("build-network {}", record.interfaces.len()));
        Ok(())
    }

    fn remove_network(&self, _: &NetworkRecord, _: &str) {
        self.record("remove-network");
    }

    fn make_pod_ipc_namespace(&self, leader: &str) -> Result<(), MigrationError> {
        self.record(format!("make-ipc {leader}"));
        Ok(())
    }

    fn remove_pod_ipc_namespace(&self, leader: &str) {
        self.record(format!("remove-ipc {leader}"));
    }

    fn restore(&self, r: &RestoreRequest<'_>, started: &mut dyn FnMut(u32)) -> Result<(), MigrationError> {
        // What a restore would see: the fence in the bundle's CRIU
        // configuration, the images and the rootfs as the source sent them.
        let config = std::fs::read_to_string(r.bundle.join(container_runtime::bundle::CRIU_RESTORE_CONFIG)).unwrap_or_default();
        let fenced = config.lines().any(|l| l == LEAVE_STOPPED.trim_end());
        let inventory = std::fs::read(r.images.join("inventory.img")).unwrap_or_default();
        let hostname = std::fs::read(r.bundle.join("rootfs/etc/hostname")).unwrap_or_default();
        self.record(format!("restore fenced={fenced} inventory={} rootfs={}", inventory == b"fake inventory", hostname == b"web\n"));
        started(std::process::id());
        match self.fault {
            HostFault::RestoreFails => Err(MigrationError::Other("runc restore: scripted failure".into())),
            _ => Ok(()),
        }
    }

    fn check_stopped(&self, dest_id: &str) -> Result<(i32, usize), MigrationError> {
        match self.fault {
            HostFault::TaskNotStopped => Err(MigrationError::Remote(format!("task 7 of {dest_id} is running before the Commit"))),
            _ => Ok((4242, 1)),
        }
    }

    fn run(&self, _: &DestinationPlan, _: &str) -> Result<(), MigrationError> {
        self.record("run");
        Ok(())
    }

    fn nudge(&self, _: &Path, connections: &[container_network::nudge::TcpConnection]) -> Result<usize, MigrationError> {
        self.record(format!("nudge {}", connections.len()));
        Ok(connections.len())
    }

    fn remove(&self, _: &str, _: &Path) {
        self.record("remove");
    }
}

/// How the scripted source ends the migration once it has Ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceEnd {
    Commit,
    Abort,
}

struct Run {
    calls: Vec<String>,
    /// The receiver's exit code on failure.
    exit: Result<(), i32>,
    /// The Error the source was sent, if any.
    error: Option<ErrorCode>,
    journal_state: String,
    bundle: PathBuf,
    /// What is left in the receiver's work root.
    work_left: usize,
    /// The receiver's metrics after the migration.
    metrics: crate::metrics::exposition::Exposition,
    /// Holds everything above until the test is done.
    _dir: tempfile::TempDir,
}

impl Run {
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut all = vec![("role", "receiver")];
        all.extend_from_slice(labels);
        self.metrics.value(name, &all).unwrap_or_else(|| panic!("no {name} {labels:?}"))
    }
}

fn receive_one(fault: HostFault, end: SourceEnd) -> Run {
    receive(fault, end, None)
}

/// `network`: the source's network namespace, moved by ctmigrate.
fn receive(fault: HostFault, end: SourceEnd, network: Option<migration_protocol::NetworkWire>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let src_rootfs = dir.path().join("src-rootfs");
    std::fs::create_dir_all(src_rootfs.join("etc")).unwrap();
    std::fs::write(src_rootfs.join("etc/hostname"), b"web\n").unwrap();
    let src_images = dir.path().join("src-images");
    std::fs::create_dir_all(&src_images).unwrap();
    std::fs::write(src_images.join("inventory.img"), b"fake inventory").unwrap();
    std::fs::write(src_images.join("pages-1.img"), vec![7u8; 3 * 4096]).unwrap();

    // A destination id of this test's own: the admission registry is
    // shared by the tests running at once.
    let dest_id = format!("web-{}", crate::journal::new_migration_id());
    let opts = ReceiveOptions {
        listen: String::new(),
        once: true,
        bundle_root: dir.path().join("bundles"),
        runtime_root: dir.path().join("runc"),
        cgroup_parent: format!("/ctmigrate-unit-{dest_id}"),
        work_root: dir.path().join("work"),
        runc_binary: "runc-not-used".into(),
        io_timeout: Duration::from_secs(10),
        max_image_file: 1 << 30,
        max_image_files: 100,
        max_bytes: 1 << 30,
        security: crate::tls::Security::Insecure,
        audit_log: dir.path().join("audit.log"),
        allowed_bind_sources: Vec::new(),
        unpack: rootfs::UnpackPolicy::default(),
        bridge: None,
        stage_images: crate::scratch::StageMode::Disk,
        journal_dir: dir.path().join("journal"),
        handshake_timeout: Duration::from_secs(10),
        max_handshakes: 4,
        max_handshakes_per_ip: 4,
        max_migrations: 4,
        staging_memory: None,
    };
    let calls: Calls = Default::default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(crate::metrics::Metrics::new(crate::metrics::Role::Receiver));
    let receiver = {
        let (opts, calls, metrics) = (opts.clone(), calls.clone(), metrics.clone());
        std::thread::spawn(move || {
            let (stream, peer) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let runc = Runc::new(&opts.runc_binary, &opts.runtime_root);
            let host: Arc<dyn DestinationHost> = Arc::new(FakeHost { calls, fault });
            let rep = Reporter::with_mode(crate::events::ReportMode::Quiet).with_metrics(metrics);
            serve_as(&opts, &runc, host, crate::tls::Conn::plain(stream).unwrap(), peer.to_string(), &rep).map(|_| ()).map_err(|(_, o)| o.exit_code())
        })
    };

    // The scripted source.
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = FrameReader::new(stream.try_clone().unwrap());
    let mut writer = FrameWriter::new(stream.try_clone().unwrap());
    let mut comp = Compressor::new(migration_protocol::CompressionMode::Never);
    writer.write_json(MessageKind::Hello, &Hello { min_version: PROTOCOL_VERSION_MAX, max_version: PROTOCOL_VERSION_MAX, software: "scripted".into() }).unwrap();
    writer.flush().unwrap();
    reader.read_frame().unwrap().expect(MessageKind::HelloAck, "HelloAck").unwrap();
    let migration_id = crate::journal::new_migration_id();
    let manifest = Manifest {
        migration_id: migration_id.clone(),
        container_id: "web".into(),
        dest_id: dest_id.clone(),
        oci_config: serde_json::to_value(container_runtime::Spec::default()).unwrap(),
        criu_version: "4.2.1".into(),
        kernel: "scripted".into(),
        arch: std::env::consts::ARCH.into(),
        cgroup_version: 2,
        mode: "stop-copy".into(),
        max_rounds: 0,
        tcp_established: false,
        network,
        memory_bytes: 1 << 20,
        empty_tmpfs: Vec::new(),
        pod: None,
        source_host: "scripted".into(),
    };
    writer.write_json(MessageKind::Manifest, &manifest).unwrap();
    writer.flush().unwrap();
    let answer = reader.read_frame().unwrap();
    assert_eq!(answer.kind, MessageKind::ManifestAccepted, "{}", String::from_utf8_lossy(&answer.payload));
    let mut tree = rootfs::TreeSender::new(&src_rootfs, Default::default());
    tree.initial_pass(&mut writer, &mut comp, &mut |_| {}).unwrap();
    tree.delta_pass(&mut writer, &mut comp, RootfsPhase::Frozen).unwrap();
    writer.write_json(MessageKind::RoundBegin, &RoundBegin { round: 1, kind: RoundKind::Final }).unwrap();
    crate::images::ImageStreamer::new(&src_images).finish(&mut writer, &mut comp, 1).unwrap();
    writer.flush().unwrap();
    let mut error = None;
    match reader.read_frame() {
        Ok(f) if f.kind == MessageKind::Ready => {
            match end {
                SourceEnd::Commit => writer.write_frame(MessageKind::Commit, b"").unwrap(),
                SourceEnd::Abort => writer.write_json(MessageKind::Abort, &migration_protocol::Abort { reason: "scripted".into() }).unwrap(),
            }
            writer.flush().unwrap();
            if end == SourceEnd::Commit {
                reader.read_frame().unwrap().expect(MessageKind::CommitAck, "CommitAck").unwrap();
            }
        }
        Ok(f) if f.kind == MessageKind::Error => error = Some(f.json::<ErrorMessage>().unwrap().code),
        other => panic!("the receiver answered the images with {other:?}"),
    }
    drop((reader, writer, stream));
    let exit = receiver.join().unwrap();
    let entry = Journal::new(&opts.journal_dir).load(Role::Destination, &migration_id).unwrap().expect("journalled");
    let journal_state = match entry.side {
        Side::Destination { state, .. } => format!("{state:?}"),
        Side::Source { .. } => unreachable!("a destination entry"),
    };
    let calls = calls.lock().unwrap().clone();
    let work_left = std::fs::read_dir(&opts.work_root).map(|d| d.count()).unwrap_or(0);
    let metrics = crate::metrics::exposition::parse(&metrics.render().unwrap()).unwrap();
    Run { calls, exit, error, journal_state, bundle: opts.bundle_root.join(&dest_id), work_left, metrics, _dir: dir }
}

const RESTORED: &str = "restore fenced=true inventory=true rootfs=true";

#[test]
fn a_committed_copy_is_restored_stopped_and_runs_only_after_the_commit() {
    let run = receive_one(HostFault::None, SourceEnd::Commit);
    assert_eq!(run.exit, Ok(()));
    assert_eq!(run.calls, [RESTORED, "run"]);
    assert_eq!(run.journal_state, "Running");
    // The bundle stays, committed (no staging marker), without the fence
    // (later checkpoints must not leave their tasks stopped); the work
    // directory goes.
    assert_eq!(std::fs::read(run.bundle.join("rootfs/etc/hostname")).unwrap(), b"web\n");
    assert!(!run.bundle.join(INCOMPLETE_MARKER).exists());
    let config = std::fs::read_to_string(run.bundle.join(container_runtime::bundle::CRIU_RESTORE_CONFIG)).unwrap();
    assert!(!config.contains(LEAVE_STOPPED.trim_end()), "{config}");
    assert_eq!(run.work_left, 0, "work directories stayed");
    // Counted: one ok, its bytes, its frozen and total time; none in flight.
    assert_eq!(run.metric("ctmigrate_migrations_total", &[("result", "ok")]), 1.0);
    assert_eq!(run.metric("ctmigrate_migrations_in_flight", &[]), 0.0);
    assert_eq!(run.metric("ctmigrate_frozen_seconds_count", &[]), 1.0);
    assert_eq!(run.metric("ctmigrate_migration_seconds_count", &[]), 1.0);
    assert!(run.metric("ctmigrate_wire_bytes_total", &[]) > 3.0 * 4096.0);
    assert!(run.metric("ctmigrate_raw_bytes_total", &[]) > 3.0 * 4096.0);
    assert_eq!(run.metric("ctmigrate_rollbacks_total", &[]), 0.0);
}

#[test]
fn an_abort_after_ready_removes_the_stopped_copy() {
    let run = receive_one(HostFault::None, SourceEnd::Abort);
    assert_eq!(run.exit, Err(Outcome::SourceResumed.exit_code()));
    assert_eq!(run.calls, [RESTORED, "remove"]);
    assert_eq!(run.journal_state, "Aborted");
    assert!(!run.bundle.exists(), "the bundle of a removed copy stayed");
    assert_eq!(run.work_left, 0);
    // Counted as rolled back; its copy never ran: no frozen time.
    assert_eq!(run.metric("ctmigrate_migrations_total", &[("result", "rolled_back")]), 1.0);
    assert_eq!(run.metric("ctmigrate_migrations_total", &[("result", "ok")]), 0.0);
    assert_eq!(run.metric("ctmigrate_rollbacks_total", &[]), 1.0);
    assert_eq!(run.metric("ctmigrate_frozen_seconds_count", &[]), 0.0);
    assert_eq!(run.metric("ctmigrate_migrations_in_flight", &[]), 0.0);
}

#[test]
fn a_failed_restore_is_removed_and_the_source_told() {
    let run = receive_one(HostFault::RestoreFails, SourceEnd::Commit);
    assert_eq!(run.error, Some(ErrorCode::RestoreFailed));
    assert_eq!(run.calls, [RESTORED, "remove"]);
    assert_eq!(run.journal_state, "Aborted");
    assert!(!run.bundle.exists());
}

#[test]
fn a_task_running_before_the_commit_fails_the_restore_and_the_copy_goes() {
    let run = receive_one(HostFault::TaskNotStopped, SourceEnd::Commit);
    assert_eq!(run.error, Some(ErrorCode::RestoreFailed));
    assert_eq!(run.calls, [RESTORED, "remove"]);
    assert!(!run.bundle.exists());
}

#[test]
fn the_network_is_built_before_the_restore_and_removed_with_the_copy() {
    // A namespace with loopback only (interfaces would need a bridge).
    let loopback_only = || Some(migration_protocol::NetworkWire { interfaces: Vec::new(), routes: Vec::new() });
    let run = receive(HostFault::None, SourceEnd::Abort, loopback_only());
    assert_eq!(run.calls, ["build-network 0", RESTORED, "remove", "remove-network"]);
    let run = receive(HostFault::None, SourceEnd::Commit, loopback_only());
    assert_eq!(run.calls, ["build-network 0", RESTORED, "run"]);
}
