//! Moving CRIU's image files.
//!
//! Page images (`pages-*.img`) hold nearly all the bytes and CRIU only
//! appends to them, so the sender streams them while CRIU is still writing.
//! The other images are small and some are rewritten in place before CRIU
//! finishes (the inventory, for one), so they are sent once CRIU returns.
//! ImagesDone then lists every file with its size and CRC-32C, and the
//! receiver checks its copy against that list before restoring.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use migration_protocol::frame::encode_header;
use migration_protocol::{Compressor, Frame, FrameWriter, ImageData, ImageFileSummary, ImagesDone, MessageKind};

use crate::scratch::Reserve;
use crate::{MigrationError};

const CHUNK: usize = 1 << 20;
/// Room for the longest ImageData prefix: name length, name, offset.
const FRAME_ROOM: usize = 2 + migration_protocol::MAX_IMAGE_NAME + 8;
/// Sent page data is punched out of the sender's files this much at a time.
const PUNCH_BATCH: u64 = 8 << 20;

/// Files CRIU only appends to, safe to stream while it writes.
pub fn is_append_only(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// An image file name as the receiver accepts it: one plain component of
/// letters, digits and `._-`, not starting with a dot.
pub fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= migration_protocol::MAX_IMAGE_NAME
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Why relaying pages stopped: the source (CRIU's socket) failed, or
/// sending them on did.
#[derive(Debug)]
pub enum RelayError {
    Source(std::io::Error),
    Send(MigrationError),
}

/// Sizes of one round of images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundBytes {
    /// All image files.
    pub images: u64,
    /// Memory pages (`pages-*.img`).
    pub pages: u64,
    /// Of `pages`, those CRIU handed over its page-server socket: never
    /// staged on the sending host.
    pub relayed_pages: u64,
    /// How long CRIU itself ran, in milliseconds.
    pub criu_ms: u64,
}

#[derive(Debug, Default)]
struct Sent {
    offset: u64,
    crc: u32,
}

/// Sender side: follows the images directory and sends what is new.
pub struct ImageStreamer {
    dir: PathBuf,
    sent: BTreeMap<String, Sent>,
    /// Images that come from CRIU's page-server socket, not from files.
    relayed: BTreeSet<String>,
    frame: Vec<u8>,
    /// Fault injection (`sender-corrupt-image`): the next chunk is damaged
    /// after its checksum was taken.
    #[cfg(feature = "failpoints")]
    corrupt_next: bool,
}

impl ImageStreamer {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            sent: BTreeMap::new(),
            relayed: BTreeSet::new(),
            frame: vec![0u8; FRAME_ROOM + CHUNK],
            #[cfg(feature = "failpoints")]
            corrupt_next: corrupt_at!("sender-corrupt-image"),
        }
    }

    fn names(&self) -> Result<Vec<String>, MigrationError> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(MigrationError::io(format!("listing {}", self.dir.display())))? {
            let e = e.map_err(MigrationError::io("listing images"))?;
            if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Sends whatever the append-only files gained since the last call.
    /// Returns the number of payload bytes sent.
    pub fn pump<W: Write>(&mut self, out: &mut FrameWriter<W>, comp: &mut Compressor) -> Result<u64, MigrationError> {
        let mut total = 0;
        for name in self.names()? {
            if is_append_only(&name) {
                total += self.send_tail(out, comp, &name)?;
            }
        }
        Ok(total)
    }

    /// After CRIU returned: the rest of every file, then ImagesDone.
    /// Returns the sizes of what the round holds.
    pub fn finish<W: Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        comp: &mut Compressor,
        dump_ms: u64,
    ) -> Result<RoundBytes, MigrationError> {
        let mut files = Vec::new();
        for name in self.names()? {
            self.send_tail(out, comp, &name)?;
            let s = &self.sent[&name];
            let size = std::fs::metadata(self.dir.join(&name)).map_err(MigrationError::io("stat image"))?.len();
            if size != s.offset {
                return Err(MigrationError::Other(format!(
                    "image {name} changed size after it was sent ({} → {size} bytes)",
                    s.offset
                )));
            }
            files.push(ImageFileSummary { name: name.clone(), size, crc32c: s.crc });
        }
        for name in &self.relayed {
            if files.iter().any(|f| &f.name == name) {
                return Err(MigrationError::Other(format!("CRIU wrote image {name} and relayed it too")));
            }
            let s = &self.sent[name];
            files.push(ImageFileSummary { name: name.clone(), size: s.offset, crc32c: s.crc });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = RoundBytes {
            images: files.iter().map(|f| f.size).sum(),
            pages: files.iter().filter(|f| is_append_only(&f.name)).map(|f| f.size).sum(),
            relayed_pages: files.iter().filter(|f| is_append_only(&f.name) && self.relayed.contains(&f.name)).map(|f| f.size).sum(),
            criu_ms: dump_ms,
        };
        out.write_json(MessageKind::ImagesDone, &ImagesDone { files, dump_ms })?;
        Ok(bytes)
    }

    fn send_tail<W: Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        comp: &mut Compressor,
        name: &str,
    ) -> Result<u64, MigrationError> {
        let path = self.dir.join(name);
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(MigrationError::io(format!("opening {}", path.display())))?;
        let release = is_append_only(name);
        let prefix_len = self.start_file_frames(name)?;
        let mut offset = self.sent[name].offset;
        let mut total = 0;
        // Punching takes the file's lock, which CRIU holds while it
        // writes: punch in batches, not chunk by chunk.
        let mut unpunched = offset;
        loop {
            let n = f.read_at(&mut self.frame[FRAME_ROOM..], offset).map_err(MigrationError::io(format!("reading {}", path.display())))?;
            if n == 0 {
                break;
            }
            self.send_chunk(out, comp, name, prefix_len, n)?;
            offset += n as u64;
            total += n as u64;
            if release && offset - unpunched >= PUNCH_BATCH {
                // Sent pages are not needed here again: free their memory
                // now, so CRIU's next writes reuse warm memory and a
                // migration does not hold the container's memory twice.
                // (Measured: a final dump that kept them, CRIU writing into
                // other free memory, was slower and far less steady.)
                crate::scratch::free_range(&f, unpunched, offset - unpunched);
                unpunched = offset;
            }
        }
        if release && offset > unpunched {
            crate::scratch::free_range(&f, unpunched, offset - unpunched);
        }
        Ok(total)
    }

    /// Declares `name` an image this side never stores: its bytes come
    /// through [`relay`](Self::relay) or [`send_relayed_file`](Self::send_relayed_file),
    /// and it is listed in ImagesDone (empty if nothing came).
    pub fn add_relayed(&mut self, name: &str) -> Result<(), MigrationError> {
        if !valid_image_name(name) || self.sent.contains_key(name) {
            return Err(MigrationError::Other(format!("CRIU named image {name:?} twice or unusably")));
        }
        self.sent.insert(name.to_string(), Sent::default());
        self.relayed.insert(name.to_string());
        Ok(())
    }

    /// Sends the next `len` bytes of the relayed image `name`, read from
    /// `source` (CRIU's page-server socket) straight into the frame buffer.
    pub fn relay<W: Write, R: Read>(
        &mut self,
        out: &mut FrameWriter<W>,
        comp: &mut Compressor,
        name: &str,
        source: &mut R,
        len: u64,
    ) -> Result<(), RelayError> {
        let prefix_len = self.start_file_frames(name).map_err(RelayError::Send)?;
        let mut left = len;
        while left > 0 {
            let n = (CHUNK as u64).min(left) as usize;
            source.read_exact(&mut self.frame[FRAME_ROOM..FRAME_ROOM + n]).map_err(RelayError::Source)?;
            self.send_chunk(out, comp, name, prefix_len, n).map_err(RelayError::Send)?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Sends the whole of the relayed image `name`, made in memory.
    pub fn send_relayed_file<W: Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        comp: &mut Compressor,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), MigrationError> {
        self.relay(out, comp, name, &mut &bytes[..], bytes.len() as u64).map_err(|e| match e {
            RelayError::Send(e) => e,
            RelayError::Source(e) => MigrationError::Io { context: format!("reading {name} from memory"), source: e },
        })
    }

    /// Writes `name`'s frame prefix into the frame buffer so that it ends
    /// at FRAME_ROOM, where the data goes whatever the name's length; only
    /// the offset (the prefix's last 8 bytes) changes between chunks.
    /// Returns the prefix's length.
    fn start_file_frames(&mut self, name: &str) -> Result<usize, MigrationError> {
        if name.len() > migration_protocol::MAX_IMAGE_NAME {
            return Err(MigrationError::Other(format!("image file name too long to send: {name}")));
        }
        let state = self.sent.entry(name.to_string()).or_default();
        let mut prefix = Vec::with_capacity(FRAME_ROOM);
        ImageData::encode_prefix(name, state.offset, &mut prefix);
        self.frame[FRAME_ROOM - prefix.len()..FRAME_ROOM].copy_from_slice(&prefix);
        Ok(prefix.len())
    }

    /// Sends the `n` bytes at FRAME_ROOM in the frame buffer as `name`'s
    /// next chunk. The buffer is never cleared or resized: this runs for
    /// every MiB sent.
    fn send_chunk<W: Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        comp: &mut Compressor,
        name: &str,
        prefix_len: usize,
        n: usize,
    ) -> Result<(), MigrationError> {
        let state = self.sent.get_mut(name).expect("start_file_frames registered the file");
        self.frame[FRAME_ROOM - 8..FRAME_ROOM].copy_from_slice(&state.offset.to_le_bytes());
        let frame = &mut self.frame[FRAME_ROOM - prefix_len..FRAME_ROOM + n];
        // One pass over the data serves the image's CRC and the frame's.
        let data_crc = crc32c::crc32c(&frame[prefix_len..]);
        state.crc = migration_protocol::crc::combine(state.crc, data_crc, n);
        state.offset += n as u64;
        #[cfg(feature = "failpoints")]
        let corrupt = std::mem::take(&mut self.corrupt_next);
        #[cfg(not(feature = "failpoints"))]
        let corrupt = false;
        if corrupt {
            // Fault injection: the frame's checksum is for the intact
            // bytes, then one byte flips, as a bad link would do.
            let header = encode_header(MessageKind::ImageData, frame, frame.len() as u32, false);
            let last = frame.len() - 1;
            frame[last] ^= 0xff;
            out.get_mut().write_all(&header).map_err(MigrationError::io("sending images"))?;
            out.get_mut().write_all(frame).map_err(MigrationError::io("sending images"))?;
            frame[last] ^= 0xff;
        } else {
            let payload_crc = migration_protocol::crc::combine(crc32c::crc32c(&frame[..prefix_len]), data_crc, n);
            comp.write_with_crc(out, MessageKind::ImageData, frame, payload_crc)?;
        }
        Ok(())
    }
}

/// A page image this long takes over the staging reserve (see
/// [`ImageSink::with_reserve`]): long enough to pass over a small init
/// process's pages, short enough that copying what arrived before costs
/// nothing.
const ADOPT_RESERVE_AT: u64 = 4 << 20;

#[derive(Debug)]
struct Received {
    file: File,
    size: u64,
    /// Running CRC while chunks arrive in order; None once one did not.
    crc: Option<u32>,
    /// The file is the former staging reserve, longer than `size` until
    /// verified.
    adopted: bool,
}

/// Receiver side: writes image chunks into a directory and verifies them.
pub struct ImageSink {
    dir: PathBuf,
    files: BTreeMap<String, Received>,
    max_files: usize,
    max_file_size: u64,
    reserve: Option<Reserve>,
    pub bytes: u64,
}

impl ImageSink {
    pub fn new(dir: &Path, max_files: usize, max_file_size: u64) -> Self {
        Self { dir: dir.to_path_buf(), files: BTreeMap::new(), max_files, max_file_size, reserve: None, bytes: 0 }
    }

    /// Staging memory set aside before the freeze. Each chunk gives back
    /// as much of it as the chunk brings, just before it is written; the
    /// first page image to reach ADOPT_RESERVE_AT bytes takes over the
    /// reserve's file instead, so that the bulk of the pages is written
    /// over memory already touched.
    pub fn with_reserve(mut self, reserve: Option<Reserve>) -> Self {
        self.reserve = reserve;
        self
    }

    /// The reserve, if no image took it over (for the next round).
    pub fn take_reserve(&mut self) -> Option<Reserve> {
        self.reserve.take()
    }

    /// Writes one chunk; `data_crc` is the CRC-32C of its data when the
    /// caller has it (from the frame check), else it is computed here.
    fn write(&mut self, chunk: &ImageData<'_>, data_crc: Option<u32>) -> Result<(), MigrationError> {
        if !valid_image_name(chunk.name) {
            return Err(MigrationError::BadStream(format!("refusing image file name {:?}", chunk.name)));
        }
        let end = chunk.offset.checked_add(chunk.data.len() as u64).filter(|e| *e <= self.max_file_size);
        let Some(end) = end else {
            return Err(MigrationError::BadStream(format!(
                "image {} would exceed {} bytes",
                chunk.name, self.max_file_size
            )));
        };
        if !self.files.contains_key(chunk.name) {
            if self.files.len() >= self.max_files {
                return Err(MigrationError::BadStream(format!("more than {} image files", self.max_files)));
            }
            let path = self.dir.join(chunk.name);
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(MigrationError::io(format!("creating {}", path.display())))?;
            self.files.insert(chunk.name.to_string(), Received { file, size: 0, crc: Some(0), adopted: false });
        }
        let r = self.files.get_mut(chunk.name).expect("inserted above");
        if !r.adopted {
            if let Some(reserve) = self.reserve.as_mut() {
                reserve.release(chunk.data.len() as u64);
            }
        }
        r.file
            .write_all_at(chunk.data, chunk.offset)
            .map_err(MigrationError::io(format!("writing image {}", chunk.name)))?;
        r.crc = match r.crc {
            Some(c) if chunk.offset == r.size => Some(match data_crc {
                Some(d) => migration_protocol::crc::combine(c, d, chunk.data.len()),
                None => crc32c::crc32c_append(c, chunk.data),
            }),
            _ => None,
        };
        r.size = r.size.max(end);
        self.bytes += chunk.data.len() as u64;
        if is_append_only(chunk.name) && r.size >= ADOPT_RESERVE_AT && !r.adopted {
            if let Some(reserve) = self.reserve.take() {
                r.file = reserve.adopt_as(&self.dir.join(chunk.name), &r.file, r.size)?;
                r.adopted = true;
            }
        }
        Ok(())
    }

    /// Decodes an ImageData frame and writes its chunk, with the chunk's
    /// CRC taken from the frame check when the frame had one. Returns the
    /// chunk's data length.
    pub fn write_frame(&mut self, frame: &Frame) -> Result<usize, MigrationError> {
        let chunk = ImageData::decode(&frame.payload)?;
        self.write(&chunk, frame.payload_crc.map(|c| chunk.data_crc(&frame.payload, c)))?;
        Ok(chunk.data.len())
    }

    /// Checks every file against the sender's list: same set, sizes, CRCs.
    pub fn verify(&mut self, done: &ImagesDone) -> Result<(), MigrationError> {
        let listed: BTreeMap<&str, &ImageFileSummary> = done.files.iter().map(|f| (f.name.as_str(), f)).collect();
        for name in self.files.keys() {
            if !listed.contains_key(name.as_str()) {
                return Err(MigrationError::BadStream(format!("image {name} was sent but not listed")));
            }
        }
        for f in &done.files {
            if !valid_image_name(&f.name) {
                return Err(MigrationError::BadStream(format!("refusing image file name {:?}", f.name)));
            }
            // An empty file is listed but never sent as a chunk: made here,
            // and kept as received (so that verifying twice is alike).
            if f.size == 0 && !self.files.contains_key(&f.name) {
                let path = self.dir.join(&f.name);
                let file = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(MigrationError::io(format!("creating {}", path.display())))?;
                self.files.insert(f.name.clone(), Received { file, size: 0, crc: Some(0), adopted: false });
            }
            let crc = match self.files.get_mut(&f.name) {
                None => return Err(MigrationError::BadStream(format!("image {} listed but never received", f.name))),
                Some(r) => {
                    if r.adopted {
                        // The reserve's length goes; what lies past the
                        // image's end was never written.
                        r.file.set_len(r.size).map_err(MigrationError::io(format!("truncating image {}", f.name)))?;
                        r.adopted = false;
                    }
                    if r.size != f.size {
                        return Err(MigrationError::BadStream(format!(
                            "image {} is {} bytes, the sender's is {}",
                            f.name, r.size, f.size
                        )));
                    }
                    match r.crc {
                        Some(c) => c,
                        None => file_crc(&mut r.file)?,
                    }
                }
            };
            if crc != f.crc32c {
                return Err(MigrationError::BadStream(format!(
                    "image {} checksum {crc:#010x} differs from the sender's {:#010x}",
                    f.name, f.crc32c
                )));
            }
        }
        Ok(())
    }
}

fn file_crc(f: &mut File) -> Result<u32, MigrationError> {
    let mut buf = vec![0u8; CHUNK];
    let mut crc = 0;
    let mut off = 0;
    loop {
        let n = f.read_at(&mut buf, off).map_err(MigrationError::io("reading image back"))?;
        if n == 0 {
            return Ok(crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        off += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_protocol::{CompressionMode, FrameReader};

    /// Feeds a sender's stream to `sink`; returns its ImagesDone.
    fn deliver(stream: &[u8], sink: &mut ImageSink) -> ImagesDone {
        let mut r = FrameReader::new(stream);
        loop {
            let f = r.read_frame().unwrap();
            match f.kind {
                MessageKind::ImageData => {
                    sink.write_frame(&f).unwrap();
                }
                MessageKind::ImagesDone => return f.json().unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn streamed_images_arrive_intact_and_are_verified() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("pages-1.img"), vec![1u8; 3 * CHUNK / 2]).unwrap();
        let mut w = FrameWriter::new(Vec::new());
        let mut c = Compressor::new(CompressionMode::Auto);
        let mut s = ImageStreamer::new(src.path());
        s.pump(&mut w, &mut c).unwrap();
        // CRIU appends more pages and writes its metadata.
        let mut f = OpenOptions::new().append(true).open(src.path().join("pages-1.img")).unwrap();
        f.write_all(&[2u8; 100]).unwrap();
        std::fs::write(src.path().join("inventory.img"), b"inv").unwrap();
        std::fs::write(src.path().join("empty.img"), b"").unwrap();
        let bytes = s.finish(&mut w, &mut c, 5).unwrap();
        assert_eq!(bytes, RoundBytes { images: (3 * CHUNK / 2 + 100 + 3) as u64, pages: (3 * CHUNK / 2 + 100) as u64, relayed_pages: 0, criu_ms: 5 });

        let mut sink = ImageSink::new(dst.path(), 100, 1 << 30);
        let done = deliver(w.get_ref(), &mut sink);
        sink.verify(&done).unwrap();
        // A tampered list is caught.
        let mut bad = done.clone();
        bad.files.iter_mut().find(|f| f.name == "pages-1.img").unwrap().crc32c ^= 1;
        assert_bad_stream(sink.verify(&bad));
        let mut unlisted = done.clone();
        unlisted.files.retain(|f| f.name != "inventory.img");
        assert_bad_stream(sink.verify(&unlisted));
        let mut pages = vec![1u8; 3 * CHUNK / 2];
        pages.extend_from_slice(&[2u8; 100]);
        assert_eq!(std::fs::read(dst.path().join("pages-1.img")).unwrap(), pages);
        // The sender's copy of sent pages is released (a hole), its size kept.
        let left = std::fs::read(src.path().join("pages-1.img")).unwrap();
        assert_eq!(left.len(), pages.len());
        assert!(left.iter().all(|b| *b == 0), "sent pages were not released");
        assert_eq!(std::fs::read(dst.path().join("inventory.img")).unwrap(), b"inv");
        assert!(dst.path().join("empty.img").exists());
    }

    /// Sends `files` (name, bytes) through a sink in `images/round`, with a
    /// reserve of `reserve` bytes in `images`; returns the reserve's inode
    /// and what the sink handed back.
    fn receive_with_reserve(images: &Path, files: &[(&str, Vec<u8>)], reserve: u64) -> (u64, Option<Reserve>) {
        use std::os::unix::fs::MetadataExt;
        let src = images.join("src");
        let round = images.join("round");
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&round).unwrap();
        for (name, data) in files {
            std::fs::write(src.join(name), data).unwrap();
        }
        let res = Reserve::create(images, reserve).unwrap();
        let inode = std::fs::metadata(images.join("reserve")).unwrap().ino();
        let mut w = FrameWriter::new(Vec::new());
        ImageStreamer::new(&src).finish(&mut w, &mut Compressor::new(CompressionMode::Never), 0).unwrap();
        let mut sink = ImageSink::new(&round, 100, 1 << 30).with_reserve(Some(res));
        let done = deliver(w.get_ref(), &mut sink);
        sink.verify(&done).unwrap();
        for (name, data) in files {
            assert!(std::fs::read(round.join(name)).unwrap() == *data, "{name} differs");
        }
        (inode, sink.take_reserve())
    }

    #[test]
    fn a_large_page_image_takes_over_the_reserve() {
        use std::os::unix::fs::MetadataExt;
        let images = tempfile::tempdir().unwrap();
        let small: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let large: Vec<u8> = (0..(ADOPT_RESERVE_AT as u32 + 3 * CHUNK as u32 + 5)).map(|i| (i % 253) as u8).collect();
        let files = [("inventory.img", b"inv".to_vec()), ("pages-1.img", small), ("pages-2.img", large)];
        let (inode, left) = receive_with_reserve(images.path(), &files, 16 << 20);
        // The large image is the reserve's file, cut to the image's size.
        assert_eq!(std::fs::metadata(images.path().join("round/pages-2.img")).unwrap().ino(), inode);
        assert_ne!(std::fs::metadata(images.path().join("round/pages-1.img")).unwrap().ino(), inode);
        assert!(left.is_none(), "an adopted reserve is not handed back");
        assert!(!images.path().join("reserve").exists());
    }

    #[test]
    fn small_page_images_leave_the_reserve_to_the_next_round() {
        let images = tempfile::tempdir().unwrap();
        let files = [("pages-1.img", vec![3u8; 2 * CHUNK])];
        let (_, left) = receive_with_reserve(images.path(), &files, 16 << 20);
        let left = left.expect("the reserve comes back");
        // Given back as the chunks came.
        assert_eq!(left.held(), (16 << 20) - 2 * CHUNK as u64);
        assert!(images.path().join("reserve").exists());
    }

    /// The sender broke the stream's rules: its peer is told `bad-stream`
    /// (docs/protocol.md), not `internal`.
    fn assert_bad_stream<T: std::fmt::Debug>(r: Result<T, MigrationError>) {
        let e = r.expect_err("a hostile stream was accepted");
        assert_eq!(e.peer_code(), migration_protocol::ErrorCode::BadStream, "{e}");
    }

    #[test]
    fn hostile_image_names_and_sizes_are_refused() {
        let dst = tempfile::tempdir().unwrap();
        let mut sink = ImageSink::new(dst.path(), 2, 1000);
        for name in ["../x", "a/b", ".hidden", "", "x\0y"] {
            assert_bad_stream(sink.write(&ImageData { name, offset: 0, data: b"x" }, None));
        }
        assert_bad_stream(sink.write(&ImageData { name: "big.img", offset: 999, data: b"xy" }, None));
        assert_bad_stream(sink.write(&ImageData { name: "wrap.img", offset: u64::MAX, data: b"xy" }, None));
        sink.write(&ImageData { name: "a.img", offset: 0, data: b"x" }, None).unwrap();
        sink.write(&ImageData { name: "b.img", offset: 0, data: b"x" }, None).unwrap();
        assert_bad_stream(sink.write(&ImageData { name: "c.img", offset: 0, data: b"x" }, None));
        let never_sent = ImagesDone { files: vec![ImageFileSummary { name: "c.img".into(), size: 5, crc32c: 0 }], dump_ms: 0 };
        let empty = tempfile::tempdir().unwrap();
        let err = ImageSink::new(empty.path(), 2, 1000).verify(&never_sent).expect_err("an image never received");
        assert!(err.to_string().contains("never received"), "{err}");
        assert_bad_stream::<()>(Err(err));
    }
}
