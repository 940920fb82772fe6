//! Sender → wire → receiver → verification, on real directories.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use migration_protocol::{CompressionMode, Compressor, FrameReader, FrameWriter, RootfsPhase};

use super::*;

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs one pass from `tree` into `applier`; returns what the pass sent.
fn pass(tree: &mut TreeSender, applier: &mut Applier, phase: Option<RootfsPhase>) -> (PassReport, migration_protocol::RootfsEnd) {
    let mut w = FrameWriter::new(Vec::new());
    let mut c = Compressor::new(CompressionMode::Never);
    let report = match phase {
        None => tree.initial_pass(&mut w, &mut c, &mut |_| {}).unwrap(),
        Some(p) => tree.delta_pass(&mut w, &mut c, p).unwrap(),
    };
    let bytes = w.get_ref().clone();
    let mut r = FrameReader::new(&bytes[..]);
    let first = r.read_frame().unwrap();
    let (end, _) = applier.receive_pass(&mut r, first).unwrap();
    (report, end)
}

fn make_source(src: &Path) {
    std::fs::create_dir_all(src.join("etc/app")).unwrap();
    std::fs::write(src.join("etc/app/conf"), "one").unwrap();
    std::fs::write(src.join("keep"), "k").unwrap();
    std::fs::write(src.join("gone"), "g").unwrap();
    std::os::unix::fs::symlink("etc/app/conf", src.join("link")).unwrap();
    std::fs::write(src.join("perl"), "#!perl").unwrap();
    std::fs::hard_link(src.join("perl"), src.join("perl5.36.0")).unwrap();
    // A hard link in another directory than its file.
    std::fs::hard_link(src.join("perl"), src.join("etc/app/perl-too")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    std::fs::write(src.join("su"), "x").unwrap();
    std::fs::set_permissions(src.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    xattr::set(src.join("keep"), "user.note", b"hello").unwrap();
    // Sparse: 8 MiB with 4 KiB of data in the middle.
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 4 << 20).unwrap();
    // Hidden by a mount in the container: never sent.
    std::fs::create_dir_all(src.join("dev")).unwrap();
    std::fs::write(src.join("dev/under-the-tmpfs"), "x").unwrap();
}

#[test]
fn passes_reproduce_the_tree_and_verification_proves_it() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    make_source(src.path());
    std::fs::set_permissions(src.path(), std::fs::Permissions::from_mode(0o751)).unwrap();
    let hidden: BTreeSet<_> = [std::path::PathBuf::from("dev")].into();
    let mut tree = TreeSender::new(src.path(), hidden);
    let mut applier = Applier::new(dst.path(), UnpackPolicy::default()).unwrap();

    let (initial, _) = pass(&mut tree, &mut applier, None);
    assert_eq!(std::fs::read_to_string(dst.path().join("etc/app/conf")).unwrap(), "one");
    assert_eq!(std::fs::metadata(dst.path()).unwrap().permissions().mode() & 0o7777, 0o751, "the rootfs directory's own mode");
    assert_eq!(std::fs::read_link(dst.path().join("link")).unwrap(), Path::new("etc/app/conf"));
    assert!(dst.path().join("dev").is_dir(), "a mount point itself is sent");
    assert!(!dst.path().join("dev/under-the-tmpfs").exists(), "what a mount hides is not");
    let ino = |p: &str| std::fs::metadata(dst.path().join(p)).unwrap().ino();
    assert_eq!(ino("perl"), ino("perl5.36.0"), "hard links arrive as one file");
    assert_eq!(ino("perl"), ino("etc/app/perl-too"), "also across directories");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(dst.path().join("fifo")).unwrap().file_type()));
    assert_eq!(std::fs::metadata(dst.path().join("su")).unwrap().permissions().mode() & 0o7777, 0o4755);
    assert_eq!(xattr::get(dst.path().join("keep"), "user.note").unwrap().unwrap(), b"hello");
    let sparse = std::fs::metadata(dst.path().join("sparse")).unwrap();
    assert_eq!(sparse.len(), 8 << 20);
    assert!(sparse.blocks() * 512 < 1 << 20, "holes stay holes ({} blocks)", sparse.blocks());
    assert!(initial.file_bytes < 1 << 20, "holes are not sent ({} bytes)", initial.file_bytes);

    // Changes while the container runs; then a frozen pass.
    std::fs::write(src.path().join("etc/app/conf"), "two, longer").unwrap();
    std::fs::remove_file(src.path().join("gone")).unwrap();
    std::fs::create_dir(src.path().join("new")).unwrap();
    std::fs::write(src.path().join("new/inside"), "n").unwrap();
    std::fs::write(src.path().join("perl5.36.0"), "#!perl v2").unwrap();
    let (delta, _) = pass(&mut tree, &mut applier, Some(RootfsPhase::Delta));
    assert_eq!(delta.full_walk, None, "inotify followed the changes");
    assert!(delta.entries <= 8, "only what changed was sent: {delta:?}");
    assert_eq!(delta.deleted, 1);
    assert_eq!(std::fs::read_to_string(dst.path().join("perl")).unwrap(), "#!perl v2", "both names follow the content");
    assert_eq!(ino("perl"), ino("perl5.36.0"));
    assert!(!dst.path().join("gone").exists());

    std::fs::write(src.path().join("keep"), "k2").unwrap();
    let (frozen, end) = pass(&mut tree, &mut applier, Some(RootfsPhase::Frozen));
    assert_eq!(frozen.entries, 1, "{frozen:?}");
    let verified = verify::start(&mut applier, end.clone()).join().unwrap().unwrap();
    assert_eq!(Some(verified.digest.clone()), frozen.tree_digest);
    assert_eq!(std::fs::read_to_string(dst.path().join("keep")).unwrap(), "k2");
    assert_eq!(xattr::get(dst.path().join("keep"), "user.note").unwrap().unwrap(), b"hello");
}

/// `make_source`'s tree after the initial pass, applied.
struct Synced {
    src: tempfile::TempDir,
    dst: tempfile::TempDir,
    tree: TreeSender,
    applier: Applier,
}

impl Synced {
    fn new() -> Self {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        make_source(src.path());
        let mut tree = TreeSender::new(src.path(), BTreeSet::new());
        let mut applier = Applier::new(dst.path(), UnpackPolicy::default()).unwrap();
        pass(&mut tree, &mut applier, None);
        Self { src, dst, tree, applier }
    }

    /// Sends and applies the frozen pass; returns its end, for verification.
    fn frozen(&mut self) -> migration_protocol::RootfsEnd {
        pass(&mut self.tree, &mut self.applier, Some(RootfsPhase::Frozen)).1
    }

    fn verify(&mut self, end: migration_protocol::RootfsEnd) -> Result<verify::Verified, crate::MigrationError> {
        verify::start(&mut self.applier, end).join().unwrap()
    }
}

#[test]
fn an_entry_that_differs_from_its_record_is_named() {
    let mut s = Synced::new();
    std::fs::set_permissions(s.dst.path().join("etc/app/conf"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = s.applier.check_on_disk(Path::new("etc/app/conf")).unwrap_err().to_string();
    assert!(err.contains("/etc/app/conf") && err.contains("mode"), "{err}");
    std::fs::write(s.dst.path().join("stray"), "x").unwrap();
    let err = s.applier.check_on_disk(Path::new("stray")).unwrap_err().to_string();
    assert!(err.contains("/stray") && err.contains("not on the source"), "{err}");
}

#[test]
fn a_file_replaced_on_disk_has_no_digest_of_ours() {
    let mut s = Synced::new();
    replace_with_a_copy(&s.dst.path().join("etc/app/conf"));
    let err = s.applier.check_on_disk(Path::new("etc/app/conf")).unwrap_err().to_string();
    assert!(err.contains("/etc/app/conf") && err.contains("content"), "{err}");
}

#[test]
fn a_hard_link_that_is_not_its_file_fails_verification() {
    let mut s = Synced::new();
    replace_with_a_copy(&s.dst.path().join("perl5.36.0"));
    let end = s.frozen();
    let err = s.verify(end).unwrap_err().to_string();
    assert!(err.contains("hard links"), "{err}");
}

/// Same bytes, times, mode and owner: only the inode is not the one written.
fn replace_with_a_copy(file: &Path) {
    let dir = file.parent().unwrap();
    let copy = dir.join("copy");
    let (meta, dir_meta) = (std::fs::metadata(file).unwrap(), std::fs::metadata(dir).unwrap());
    std::fs::copy(file, &copy).unwrap();
    std::fs::rename(&copy, file).unwrap();
    std::fs::set_permissions(file, meta.permissions()).unwrap();
    let ts = |s, ns| nix::sys::time::TimeSpec::new(s, ns);
    for (p, m) in [(file.to_path_buf(), &meta), (dir.to_path_buf(), &dir_meta)] {
        nix::sys::stat::utimensat(None, &p, &ts(m.atime(), m.atime_nsec()), &ts(m.mtime(), m.mtime_nsec()), nix::sys::stat::UtimensatFlags::FollowSymlink).unwrap();
    }
}

#[test]
fn records_that_do_not_add_up_to_the_digest_are_refused() {
    let mut s = Synced::new();
    let mut end = s.frozen();
    end.tree_digest.replace_range(0..1, if end.tree_digest.starts_with('0') { "1" } else { "0" });
    let err = s.verify(end).unwrap_err().to_string();
    assert!(err.contains("do not add up"), "{err}");
}

#[test]
fn a_symlink_from_the_stream_cannot_redirect_a_later_entry() {
    use migration_protocol::rootfs::{EntryKind, EntryRecord};
    use migration_protocol::MessageKind;
    let outside = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut w = FrameWriter::new(Vec::new());
    let link = EntryRecord {
        path: b"etc".to_vec(),
        kind: EntryKind::Symlink as u32,
        mode: 0o777,
        target: outside.path().as_os_str().as_encoded_bytes().to_vec(),
        ..Default::default()
    };
    let file = EntryRecord { path: b"etc/passwd".to_vec(), kind: EntryKind::Fifo as u32, mode: 0o644, ..Default::default() };
    for r in [&link, &file] {
        w.write_frame(MessageKind::RootfsEntry, &prost::Message::encode_to_vec(r)).unwrap();
    }
    let bytes = w.get_ref().clone();
    let mut r = FrameReader::new(&bytes[..]);
    let first = r.read_frame().unwrap();
    let mut applier = Applier::new(dst.path(), UnpackPolicy::default()).unwrap();
    let err = applier.receive_pass(&mut r, first).unwrap_err().to_string();
    assert!(err.contains("not a directory inside the rootfs"), "{err}");
    assert!(!outside.path().join("passwd").exists());
}

#[test]
fn owners_capabilities_and_devices_arrive_when_root() {
    if !root() {
        eprintln!("SKIPPED: needs root (chown, security.* xattrs, mknod)");
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("bin")).unwrap();
    std::fs::write(src.path().join("bin/ping"), "elf").unwrap();
    std::os::unix::fs::chown(src.path().join("bin/ping"), Some(1234), Some(5678)).unwrap();
    // A file capability (cap_net_raw+ep), version 2 layout.
    let cap: [u8; 20] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    xattr::set(src.path().join("bin/ping"), "security.capability", &cap).unwrap();
    nix::sys::stat::mknod(&src.path().join("null"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o666), nix::sys::stat::makedev(1, 3)).unwrap();
    let mut tree = TreeSender::new(src.path(), BTreeSet::new());
    let mut applier = Applier::new(dst.path(), UnpackPolicy::default()).unwrap();
    pass(&mut tree, &mut applier, None);
    let (_, end) = pass(&mut tree, &mut applier, Some(RootfsPhase::Frozen));
    verify::start(&mut applier, end).join().unwrap().unwrap();
    let m = std::fs::metadata(dst.path().join("bin/ping")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(xattr::get(dst.path().join("bin/ping"), "security.capability").unwrap().unwrap(), cap);
    assert_eq!(std::fs::symlink_metadata(dst.path().join("null")).unwrap().rdev(), nix::sys::stat::makedev(1, 3));

    // Any other device is refused by the sender, before anything is sent.
    nix::sys::stat::mknod(&src.path().join("sda"), nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(8, 0)).unwrap();
    let mut tree = TreeSender::new(src.path(), BTreeSet::new());
    let mut w = FrameWriter::new(Vec::new());
    let err = tree.initial_pass(&mut w, &mut Compressor::new(CompressionMode::Never), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("block device") && err.contains("sda (8:0)"), "{err}");
}
#[test]
fn a_file_that_became_a_socket_is_deleted_on_the_destination() {
    let mut s = Synced::new();
    std::fs::remove_file(s.src.path().join("keep")).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(s.src.path().join("keep")).unwrap();
    let end = s.frozen();
    s.verify(end).unwrap();
    assert!(!s.dst.path().join("keep").exists(), "sockets are made by their owners, not copied");
}


#[test]
fn a_pass_that_compares_every_entry_gives_the_same_tree() {
    let mut s = Synced::new();
    std::fs::write(s.src.path().join("etc/app/conf"), "changed, untracked").unwrap();
    std::fs::remove_file(s.src.path().join("gone")).unwrap();
    std::fs::create_dir_all(s.src.path().join("new/deeper")).unwrap();
    std::fs::write(s.src.path().join("new/deeper/file"), "n").unwrap();
    s.tree.stop_tracking("test");
    let (report, end) = pass(&mut s.tree, &mut s.applier, Some(RootfsPhase::Frozen));
    assert_eq!(report.full_walk.as_deref(), Some("test"));
    assert_eq!(report.deleted, 1);
    s.verify(end).unwrap();
    assert_eq!(std::fs::read_to_string(s.dst.path().join("etc/app/conf")).unwrap(), "changed, untracked");
    assert!(s.dst.path().join("new/deeper/file").is_file() && !s.dst.path().join("gone").exists());
}
