//! Copying the container's root filesystem.
//!
//! The sender walks the rootfs twice: once while the container runs (every
//! entry, as a tar stream), and once frozen (only entries whose inode, size,
//! mtime or ctime changed, plus the paths that disappeared). Stamps are
//! taken before a file is read, so a write racing the first pass changes the
//! ctime and is caught by the second.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use migration_protocol::{Compressor, Frame, FrameReader, FrameWriter, MessageKind, RootfsEnd, RootfsPhase};

use crate::MigrationError;

/// Bytes of tar stream per RootfsData frame.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    mode: u32,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            mode: m.mode(),
        }
    }
}

/// What one pass saw: relative path → stamp.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    entries: BTreeMap<PathBuf, Stamp>,
}

impl Snapshot {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Turns a byte stream into RootfsData frames.
struct FrameSink<'a, W: Write> {
    out: &'a mut FrameWriter<W>,
    compressor: &'a mut Compressor,
    buf: Vec<u8>,
    on_bytes: &'a mut dyn FnMut(u64),
}

impl<W: Write> FrameSink<'_, W> {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.compressor
            .write(self.out, MessageKind::RootfsData, &self.buf)
            .map_err(std::io::Error::other)?;
        (self.on_bytes)(self.buf.len() as u64);
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for FrameSink<'_, W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_chunk()
    }
}

/// Sends one pass over `rootfs`: everything if `previous` is None, else
/// what changed since it. Returns this pass's snapshot.
pub fn send_pass<W: Write>(
    out: &mut FrameWriter<W>,
    compressor: &mut Compressor,
    rootfs: &Path,
    previous: Option<&Snapshot>,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<Snapshot, MigrationError> {
    let phase = if previous.is_some() { RootfsPhase::Delta } else { RootfsPhase::Initial };
    let mut snapshot = Snapshot::default();
    let mut entries = 0u64;
    {
        let sink = FrameSink { out: &mut *out, compressor, buf: Vec::with_capacity(CHUNK), on_bytes };
        let mut tar = tar::Builder::new(sink);
        tar.follow_symlinks(false);
        let walker = walkdir::WalkDir::new(rootfs).same_file_system(true).follow_links(false).sort_by_file_name();
        for item in walker {
            let item = match item {
                Ok(i) => i,
                // Vanished while walking: the delta pass records it as deleted.
                Err(e) if e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound) => continue,
                Err(e) => return Err(MigrationError::Other(format!("walking {}: {e}", rootfs.display()))),
            };
            let rel = item.path().strip_prefix(rootfs).expect("walkdir stays below its root").to_path_buf();
            if rel.as_os_str().is_empty() {
                continue;
            }
            let meta = match std::fs::symlink_metadata(item.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(MigrationError::io(format!("stat {}", item.path().display()))(e)),
            };
            let ft = meta.file_type();
            if std::os::unix::fs::FileTypeExt::is_socket(&ft) {
                // Sockets are recreated by the processes that own them.
                continue;
            }
            let stamp = Stamp::of(&meta);
            snapshot.entries.insert(rel.clone(), stamp);
            if previous.and_then(|p| p.entries.get(&rel)) == Some(&stamp) {
                continue;
            }
            match tar.append_path_with_name(item.path(), &rel) {
                Ok(()) => entries += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    snapshot.entries.remove(&rel);
                }
                Err(e) => return Err(MigrationError::io(format!("archiving {}", item.path().display()))(e)),
            }
        }
        let mut sink = tar.into_inner().map_err(MigrationError::io("finishing the rootfs tar stream"))?;
        sink.flush().map_err(MigrationError::io("sending the rootfs"))?;
    }
    let deleted: Vec<String> = match previous {
        Some(p) => p
            .entries
            .keys()
            .filter(|k| !snapshot.entries.contains_key(*k))
            .map(|k| k.to_string_lossy().into_owned())
            .collect(),
        None => Vec::new(),
    };
    out.write_json(MessageKind::RootfsEnd, &RootfsEnd { phase, entries, deleted })?;
    Ok(snapshot)
}

/// Reads RootfsData frames as one byte stream, up to RootfsEnd.
struct FrameSource<'a, R: Read> {
    input: &'a mut FrameReader<R>,
    current: Vec<u8>,
    pos: usize,
    end: Option<RootfsEnd>,
    received: u64,
}

impl<R: Read> FrameSource<'_, R> {
    fn next_frame(&mut self) -> Result<Option<Frame>, MigrationError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let f = self.input.read_frame()?;
        match f.kind {
            MessageKind::RootfsData => {
                self.received += f.payload.len() as u64;
                Ok(Some(f))
            }
            MessageKind::RootfsEnd => {
                self.end = Some(f.json()?);
                Ok(None)
            }
            MessageKind::Abort => {
                let a: migration_protocol::Abort = f.json()?;
                Err(MigrationError::Aborted(a.reason))
            }
            other => Err(migration_protocol::ProtocolError::UnexpectedMessage {
                expected: "RootfsData or RootfsEnd",
                got: other,
            }
            .into()),
        }
    }
}

impl<R: Read> Read for FrameSource<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.next_frame().map_err(std::io::Error::other)? {
                Some(f) => {
                    self.current = f.payload;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What the receiver allows in a rootfs stream beyond the fixed rules (no
/// escapes, no hard links, no device nodes).
#[derive(Debug, Clone, Default)]
pub struct UnpackPolicy {
    /// Clear setuid and setgid bits (`receive --strip-setuid`).
    pub strip_setuid: bool,
}

/// A path from the stream made safe to join onto the rootfs: relative,
/// without `..`, `.` or root components.
pub fn safe_relative(path: &Path) -> Result<PathBuf, MigrationError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(MigrationError::Other(format!(
                    "refusing rootfs path {}: absolute or containing `..`",
                    path.display()
                )))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(MigrationError::Other("refusing an empty rootfs path".into()));
    }
    Ok(out)
}

/// Receives one pass into `dest`, starting with `first`, the pass's first
/// frame (RootfsData, or RootfsEnd for an empty pass), which the caller
/// has already read. Entries are unpacked with tar's `unpack_in`, which
/// refuses to write through a symlink out of `dest`.
pub fn receive_pass<R: Read>(
    input: &mut FrameReader<R>,
    first: Frame,
    dest: &Path,
    policy: &UnpackPolicy,
) -> Result<(RootfsEnd, u64), MigrationError> {
    let mut source = FrameSource { input, current: Vec::new(), pos: 0, end: None, received: 0 };
    match first.kind {
        MessageKind::RootfsData => {
            source.received = first.payload.len() as u64;
            source.current = first.payload;
        }
        MessageKind::RootfsEnd => source.end = Some(first.json()?),
        other => {
            return Err(migration_protocol::ProtocolError::UnexpectedMessage { expected: "RootfsData", got: other }.into())
        }
    }
    {
        let mut archive = tar::Archive::new(&mut source);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        archive.set_unpack_xattrs(false);
        if policy.strip_setuid {
            archive.set_mask(0o6000);
        }
        let entries = archive.entries().map_err(MigrationError::io("reading the rootfs stream"))?;
        for entry in entries {
            let mut entry = entry.map_err(stream_err)?;
            let path = entry.path().map_err(stream_err)?.into_owned();
            safe_relative(&path)?;
            let kind = entry.header().entry_type();
            if kind.is_hard_link() {
                return Err(MigrationError::Other(format!("refusing hard link {} in the rootfs stream", path.display())));
            }
            // runc makes a container's device nodes itself; one arriving
            // in a rootfs could open host hardware to the container.
            if kind.is_character_special() || kind.is_block_special() {
                return Err(MigrationError::Other(format!("refusing device node {} in the rootfs stream", path.display())));
            }
            let ok = entry.unpack_in(dest).map_err(|e| MigrationError::io(format!("unpacking {}", path.display()))(e))?;
            if !ok {
                return Err(MigrationError::Other(format!("refusing rootfs entry {} that escapes the rootfs", path.display())));
            }
        }
    }
    // The tar end marker may leave frames unread: drain to RootfsEnd.
    let mut sink = [0u8; 8192];
    while source.read(&mut sink).map_err(stream_err)? > 0 {}
    let end = source.end.take().ok_or_else(|| MigrationError::Other("rootfs stream ended without RootfsEnd".into()))?;
    for d in &end.deleted {
        let rel = safe_relative(Path::new(d))?;
        remove_inside(dest, &rel)?;
    }
    Ok((end, source.received))
}

fn stream_err(e: std::io::Error) -> MigrationError {
    // Frame errors travel through io::Error inside the tar reader; unwrap
    // them so the caller sees the protocol error itself.
    match e.into_inner() {
        Some(inner) => match inner.downcast::<MigrationError>() {
            Ok(m) => *m,
            Err(other) => MigrationError::Other(format!("rootfs stream: {other}")),
        },
        None => MigrationError::Other("rootfs stream: I/O error".into()),
    }
}

/// Removes `dest/rel` unless a symlink in its parent path leads out of
/// `dest`.
fn remove_inside(dest: &Path, rel: &Path) -> Result<(), MigrationError> {
    let target = dest.join(rel);
    let parent = target.parent().unwrap_or(dest);
    let canon_dest = dest.canonicalize().map_err(MigrationError::io(format!("resolving {}", dest.display())))?;
    match parent.canonicalize() {
        Ok(p) if p.starts_with(&canon_dest) => {}
        Ok(_) => {
            return Err(MigrationError::Other(format!("refusing to delete {}: outside the rootfs", rel.display())))
        }
        Err(_) => return Ok(()), // parent already gone
    }
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
        Ok(_) => std::fs::remove_file(&target),
        Err(_) => Ok(()),
    }
    .map_err(MigrationError::io(format!("deleting {}", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_protocol::CompressionMode;

    fn send(root: &Path, prev: Option<&Snapshot>) -> (Vec<u8>, Snapshot) {
        let mut w = FrameWriter::new(Vec::new());
        let mut c = Compressor::new(CompressionMode::Auto);
        let snap = send_pass(&mut w, &mut c, root, prev, &mut |_| {}).unwrap();
        (w.get_ref().clone(), snap)
    }

    #[test]
    fn initial_then_delta_pass_reproduce_the_tree() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("etc/app")).unwrap();
        std::fs::write(src.path().join("etc/app/conf"), "one").unwrap();
        std::fs::write(src.path().join("keep"), "k").unwrap();
        std::fs::write(src.path().join("gone"), "g").unwrap();
        std::os::unix::fs::symlink("etc/app/conf", src.path().join("link")).unwrap();

        let (bytes, snap) = send(src.path(), None);
        let mut r = FrameReader::new(&bytes[..]);
        let first = r.read_frame().unwrap();
        let (end, _) = receive_pass(&mut r, first, dst.path(), &UnpackPolicy::default()).unwrap();
        assert_eq!(end.phase, RootfsPhase::Initial);
        assert_eq!(std::fs::read_to_string(dst.path().join("etc/app/conf")).unwrap(), "one");
        assert_eq!(std::fs::read_link(dst.path().join("link")).unwrap(), Path::new("etc/app/conf"));

        std::fs::write(src.path().join("etc/app/conf"), "two, longer").unwrap();
        std::fs::remove_file(src.path().join("gone")).unwrap();
        std::fs::write(src.path().join("new"), "n").unwrap();
        let (bytes, _) = send(src.path(), Some(&snap));
        let mut r = FrameReader::new(&bytes[..]);
        let first = r.read_frame().unwrap();
        let (end, _) = receive_pass(&mut r, first, dst.path(), &UnpackPolicy::default()).unwrap();
        assert_eq!(end.phase, RootfsPhase::Delta);
        assert_eq!(end.deleted, vec!["gone".to_string()]);
        // Only what changed travels: the file, the new file, and the
        // directories whose entries changed.
        assert!(end.entries <= 4, "delta sent {} entries", end.entries);
        assert_eq!(std::fs::read_to_string(dst.path().join("etc/app/conf")).unwrap(), "two, longer");
        assert_eq!(std::fs::read_to_string(dst.path().join("new")).unwrap(), "n");
        assert!(!dst.path().join("gone").exists());
        assert_eq!(std::fs::read_to_string(dst.path().join("keep")).unwrap(), "k");
    }

    #[test]
    fn device_nodes_are_refused() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("dev/sda").unwrap();
        h.set_entry_type(tar::EntryType::Block);
        h.set_device_major(8).unwrap();
        h.set_device_minor(0).unwrap();
        h.set_size(0);
        h.set_cksum();
        tar.append(&h, &[][..]).unwrap();
        let data = tar.into_inner().unwrap();
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(MessageKind::RootfsData, &data).unwrap();
        w.write_json(MessageKind::RootfsEnd, &RootfsEnd { phase: RootfsPhase::Initial, entries: 1, deleted: vec![] }).unwrap();
        let bytes = w.get_ref().clone();
        let dst = tempfile::tempdir().unwrap();
        let mut r = FrameReader::new(&bytes[..]);
        let first = r.read_frame().unwrap();
        let err = receive_pass(&mut r, first, dst.path(), &UnpackPolicy::default()).unwrap_err().to_string();
        assert!(err.contains("device node"), "{err}");
        assert!(!dst.path().join("dev/sda").exists());
    }

    #[test]
    fn setuid_bits_are_kept_or_stripped_by_policy() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("su"), "x").unwrap();
        std::fs::set_permissions(src.path().join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        for (strip, want) in [(false, 0o4755), (true, 0o755)] {
            let dst = tempfile::tempdir().unwrap();
            let (bytes, _) = send(src.path(), None);
            let mut r = FrameReader::new(&bytes[..]);
            let first = r.read_frame().unwrap();
            receive_pass(&mut r, first, dst.path(), &UnpackPolicy { strip_setuid: strip }).unwrap();
            let mode = std::fs::metadata(dst.path().join("su")).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, want, "strip={strip}");
        }
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["/etc/passwd", "../x", "a/../../x", ""] {
            assert!(safe_relative(Path::new(bad)).is_err(), "{bad} accepted");
        }
        assert_eq!(safe_relative(Path::new("./a/b")).unwrap(), Path::new("a/b"));
    }
}
