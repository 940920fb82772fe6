//! Frame layout and the reader/writer that enforce it.
//!
//! ```text
//!  0        4        6        8           12          16          20          24
//!  +--------+--------+--------+-----------+-----------+-----------+-----------+
//!  | magic  | format | kind   | flags     | wire_len  | raw_len   | crc32c    |
//!  | "CTMG" | u16 LE | u16 LE | u32 LE    | u32 LE    | u32 LE    | u32 LE    |
//!  +--------+--------+--------+-----------+-----------+-----------+-----------+
//!  | payload: wire_len bytes (zstd frame if flags has COMPRESSED)            |
//!  +-------------------------------------------------------------------------+
//! ```
//! The CRC-32C covers header bytes 0..20 and the payload as sent, so a
//! flipped bit anywhere in a frame is caught before anything acts on it.

use std::io::{Read, Write};

use crate::ProtocolError;

pub const MAGIC: [u8; 4] = *b"CTMG";
/// Version of the frame layout above (the message protocol version is
/// negotiated separately in Hello/HelloAck).
pub const FRAME_FORMAT_VERSION: u16 = 1;
pub const FRAME_HEADER_LEN: usize = 24;
/// Upper bound for `wire_len` and `raw_len`: a reader never allocates more
/// than this for one frame, whatever the peer claims.
pub const MAX_PAYLOAD: u32 = 8 * 1024 * 1024;

pub const FLAG_COMPRESSED: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_COMPRESSED;

/// What a frame carries. Numbers are part of the wire format: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageKind {
    Hello = 1,
    HelloAck = 2,
    Manifest = 3,
    ManifestAccepted = 4,
    /// Protocol version 2's tar stream; not sent since version 3.
    RootfsData = 5,
    RootfsEnd = 6,
    ImageData = 7,
    ImagesDone = 8,
    /// The destination restored the container with its tasks stopped.
    Ready = 9,
    Commit = 10,
    CommitAck = 11,
    Abort = 12,
    Error = 13,
    RoundBegin = 14,
    RoundDone = 15,
    RootfsEntry = 16,
    RootfsFileData = 17,
    RootfsFileEnd = 18,
    RootfsDelete = 19,
    /// A source in doubt asks what became of a migration.
    Query = 20,
    QueryAnswer = 21,
    /// Post-copy (source to destination): the restored copy may run, on
    /// the lease the payload names, while its memory follows.
    RunOnLease = 22,
    /// Post-copy (destination to source): the lazy-pages daemon's request,
    /// its 32-byte header as is (see criu-bindings' `lazy` module).
    LazyRequest = 23,
    /// Post-copy (source to destination): the page server's answer to the
    /// oldest request: its 32-byte header, then the pages (at most 4 MiB),
    /// or for a close the 4-byte status.
    LazyReply = 24,
    /// Post-copy (destination to source): every page arrived.
    PagesComplete = 25,
    /// Post-copy (source to destination): the lease goes on.
    LeaseRenewal = 26,
    /// Version 6 (source to destination): a pod member waiting for the
    /// rest of its pod is still there. Empty; every reader skips it (it
    /// only keeps the peer's read timeout from expiring).
    Keepalive = 27,
}

impl MessageKind {
    pub fn from_u16(v: u16) -> Result<Self, ProtocolError> {
        use MessageKind::*;
        Ok(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Manifest,
            4 => ManifestAccepted,
            5 => RootfsData,
            6 => RootfsEnd,
            7 => ImageData,
            8 => ImagesDone,
            9 => Ready,
            10 => Commit,
            11 => CommitAck,
            12 => Abort,
            13 => Error,
            14 => RoundBegin,
            15 => RoundDone,
            16 => RootfsEntry,
            17 => RootfsFileData,
            18 => RootfsFileEnd,
            19 => RootfsDelete,
            20 => Query,
            21 => QueryAnswer,
            22 => RunOnLease,
            23 => LazyRequest,
            24 => LazyReply,
            25 => PagesComplete,
            26 => LeaseRenewal,
            27 => Keepalive,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// One decoded message: its kind and its (decompressed) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: MessageKind,
    pub payload: Vec<u8>,
    /// CRC-32C of `payload` when it travelled uncompressed: a by-product of
    /// the frame check that spares the image sink a second pass.
    pub payload_crc: Option<u32>,
}

/// Writes frames, compressing payloads when told to.
pub struct FrameWriter<W: Write> {
    inner: W,
    /// Payload bytes before compression, over the writer's life.
    pub raw_bytes: u64,
    /// Bytes put on the wire, headers included.
    pub wire_bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            raw_bytes: 0,
            wire_bytes: 0,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Sends a frame whose payload is `wire` as given; `raw_len` is its
    /// decompressed length when `compressed`.
    pub fn write_encoded(
        &mut self,
        kind: MessageKind,
        wire: &[u8],
        raw_len: usize,
        compressed: bool,
    ) -> Result<(), ProtocolError> {
        self.write_encoded_with_crc(kind, wire, raw_len, compressed, crc32c::crc32c(wire))
    }

    /// Like [`write_encoded`](Self::write_encoded), given `wire_crc`, the
    /// CRC-32C of `wire` (computed by a caller that had it anyway).
    pub fn write_encoded_with_crc(
        &mut self,
        kind: MessageKind,
        wire: &[u8],
        raw_len: usize,
        compressed: bool,
        wire_crc: u32,
    ) -> Result<(), ProtocolError> {
        if wire.len() > MAX_PAYLOAD as usize || raw_len > MAX_PAYLOAD as usize {
            return Err(ProtocolError::FrameTooLarge {
                len: wire.len().max(raw_len) as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        let header = encode_header_with_crc(kind, wire.len() as u32, raw_len as u32, compressed, wire_crc);
        self.inner.write_all(&header)?;
        self.inner.write_all(wire)?;
        self.raw_bytes += raw_len as u64;
        self.wire_bytes += (FRAME_HEADER_LEN + wire.len()) as u64;
        Ok(())
    }

    /// Sends an uncompressed frame.
    pub fn write_frame(&mut self, kind: MessageKind, payload: &[u8]) -> Result<(), ProtocolError> {
        self.write_encoded(kind, payload, payload.len(), false)
    }

    /// Sends a control message as JSON.
    pub fn write_json<T: serde::Serialize>(
        &mut self,
        kind: MessageKind,
        msg: &T,
    ) -> Result<(), ProtocolError> {
        let body = serde_json::to_vec(msg).map_err(|e| ProtocolError::Malformed {
            kind,
            reason: e.to_string(),
        })?;
        self.write_frame(kind, &body)
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush()?;
        Ok(())
    }
}

/// Builds the 24-byte header for `wire` (exposed for tests that hand-build
/// hostile frames).
pub fn encode_header(
    kind: MessageKind,
    wire: &[u8],
    raw_len: u32,
    compressed: bool,
) -> [u8; FRAME_HEADER_LEN] {
    encode_header_with_crc(kind, wire.len() as u32, raw_len, compressed, crc32c::crc32c(wire))
}

/// The header for a payload of `wire_len` bytes whose CRC-32C is `wire_crc`.
fn encode_header_with_crc(
    kind: MessageKind,
    wire_len: u32,
    raw_len: u32,
    compressed: bool,
    wire_crc: u32,
) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&FRAME_FORMAT_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    let flags = if compressed { FLAG_COMPRESSED } else { 0 };
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    h[12..16].copy_from_slice(&wire_len.to_le_bytes());
    h[16..20].copy_from_slice(&raw_len.to_le_bytes());
    let crc = frame_crc(&h[0..20], wire_crc, wire_len as usize);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The frame's CRC-32C (header bytes 0..20, then the payload), from the
/// payload's own CRC: one pass over the payload serves both.
fn frame_crc(header: &[u8], payload_crc: u32, payload_len: usize) -> u32 {
    crate::crc::combine(crc32c::crc32c(header), payload_crc, payload_len)
}

/// Reads and verifies frames.
pub struct FrameReader<R: Read> {
    inner: R,
    /// Bytes read off the wire, headers included.
    pub wire_bytes: u64,
    /// Payload bytes after decompression.
    pub raw_bytes: u64,
    /// Most payload bytes (after decompression) this reader accepts in all.
    limit: u64,
    /// A payload buffer handed back with [`recycle`](Self::recycle): the
    /// next frame is read into it, with no allocation and no zeroing when
    /// it is as large (image chunks are all about the same size).
    spare: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            wire_bytes: 0,
            raw_bytes: 0,
            limit: u64::MAX,
            spare: Vec::new(),
        }
    }

    /// Hands a frame's payload buffer back for the next frame to use.
    pub fn recycle(&mut self, frame: Frame) {
        if frame.payload.capacity() > self.spare.capacity() {
            self.spare = frame.payload;
        }
    }

    /// Refuse the stream once its payloads add up to more than `limit`
    /// bytes (decompressed), before decompressing the frame that would
    /// pass it.
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next frame. A clean end of stream before a header is
    /// [`ProtocolError::Closed`]; one inside a frame is `Truncated`.
    /// The next frame, [`MessageKind::Keepalive`]s skipped.
    pub fn read_frame(&mut self) -> Result<Frame, ProtocolError> {
        loop {
            let frame = self.read_any_frame()?;
            if frame.kind != MessageKind::Keepalive {
                return Ok(frame);
            }
            self.recycle(frame);
        }
    }

    fn read_any_frame(&mut self) -> Result<Frame, ProtocolError> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        match read_full(&mut self.inner, &mut h)? {
            0 => return Err(ProtocolError::Closed),
            n if n < FRAME_HEADER_LEN => return Err(ProtocolError::Truncated("inside a frame header")),
            _ => {}
        }
        let le32 = |r: std::ops::Range<usize>| u32::from_le_bytes(h[r].try_into().unwrap());
        if h[0..4] != MAGIC {
            return Err(ProtocolError::BadMagic(u32::from_be_bytes(h[0..4].try_into().unwrap())));
        }
        let format = u16::from_le_bytes([h[4], h[5]]);
        if format != FRAME_FORMAT_VERSION {
            return Err(ProtocolError::UnsupportedFrameVersion {
                got: format,
                supported: FRAME_FORMAT_VERSION,
            });
        }
        let kind = MessageKind::from_u16(u16::from_le_bytes([h[6], h[7]]))?;
        let flags = le32(8..12);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ProtocolError::UnknownFlags(flags));
        }
        let wire_len = le32(12..16);
        let raw_len = le32(16..20);
        let expected_crc = le32(20..24);
        for len in [wire_len, raw_len] {
            if len > MAX_PAYLOAD {
                return Err(ProtocolError::FrameTooLarge {
                    len: len as u64,
                    max: MAX_PAYLOAD as u64,
                });
            }
        }
        if self.raw_bytes + raw_len as u64 > self.limit {
            return Err(ProtocolError::StreamTooLarge { limit: self.limit });
        }
        let mut wire = std::mem::take(&mut self.spare);
        // Only bytes beyond the buffer's previous length are zeroed; those
        // within it are overwritten by the read below.
        wire.resize(wire_len as usize, 0);
        if read_full(&mut self.inner, &mut wire)? < wire.len() {
            return Err(ProtocolError::Truncated("inside a frame payload"));
        }
        self.wire_bytes += (FRAME_HEADER_LEN + wire.len()) as u64;
        let wire_crc = crc32c::crc32c(&wire);
        let actual_crc = frame_crc(&h[0..20], wire_crc, wire.len());
        if actual_crc != expected_crc {
            return Err(ProtocolError::ChecksumMismatch {
                kind,
                expected: expected_crc,
                actual: actual_crc,
            });
        }
        let compressed = flags & FLAG_COMPRESSED != 0;
        let payload = if compressed {
            crate::compress::decompress(kind, &wire, raw_len)?
        } else {
            if raw_len != wire_len {
                return Err(ProtocolError::SizeMismatch {
                    kind,
                    expected: raw_len,
                    actual: wire.len(),
                });
            }
            wire
        };
        self.raw_bytes += payload.len() as u64;
        Ok(Frame { kind, payload, payload_crc: (!compressed).then_some(wire_crc) })
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Frame {
    /// Decodes a JSON control message, naming the frame kind on failure.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::Malformed {
            kind: self.kind,
            reason: e.to_string(),
        })
    }

    /// Fails unless this frame is of `kind`.
    pub fn expect(self, kind: MessageKind, name: &'static str) -> Result<Frame, ProtocolError> {
        if self.kind == kind {
            Ok(self)
        } else {
            Err(ProtocolError::UnexpectedMessage {
                expected: name,
                got: self.kind,
            })
        }
    }
}
