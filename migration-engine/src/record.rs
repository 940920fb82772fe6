//! TLS 1.3 record protection for a migration connection once rustls has
//! done the handshake.
//!
//! rustls authenticates the peer and agrees the traffic keys; it then hands
//! them over (`dangerous_extract_secrets`, the interface it offers for
//! kernel TLS) and the records are sealed and opened here, with ring's AEAD,
//! exactly as RFC 8446 §5.2–5.3 lays them out: a 5-byte header (type 23,
//! version 0x0303, length), then the AEAD of the content and its one-byte
//! real type, the nonce being the traffic IV XOR the record's sequence
//! number, the header the additional data. A rustls peer reads these records
//! and they read its (see the tests).
//!
//! Why not rustls's own reader: it reads the socket 4 KiB at a time into its
//! buffer and copies each decrypted record into a newly allocated one
//! before the caller copies it out again; on this project's hosts that cost
//! the receiver more CPU than the decryption (docs/performance-history.md, run E). Here a
//! read fills a large buffer straight from the socket, records are
//! decrypted where they lie, and the caller copies the plaintext once.

use std::io::{self, Read, Write};
use std::ops::Range;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext a TLS 1.3 record may carry.
const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest encrypted payload a TLS 1.3 record may carry (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CLOSE_NOTIFY: u8 = 0;
/// Socket reads go into a buffer of this size (plus room for one record).
const READ_BUFFER: usize = 256 * 1024;

/// One direction's key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(io::Error::other("the negotiated TLS cipher suite is not supported")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| io::Error::other("bad TLS traffic key"))?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| io::Error::other("bad TLS traffic IV"))?;
        Ok(Self { key: LessSafeKey::new(key), iv, seq })
    }

    /// The next record's nonce; the sequence number never wraps.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or_else(|| io::Error::other("TLS record sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn header(len: usize) -> [u8; HEADER_LEN] {
    [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8]
}

/// Seals what is written into records and writes them to `inner`.
pub struct RecordWriter {
    dir: Direction,
    /// Sealed records waiting to be written; reused.
    out: Vec<u8>,
    /// Fault injection: damage the next record after sealing it.
    #[cfg(feature = "failpoints")]
    corrupt_next: bool,
}

impl RecordWriter {
    /// `seq` and `secrets` are the transmit half of rustls's extracted secrets.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        Ok(Self {
            dir: Direction::new(seq, secrets)?,
            out: Vec::new(),
            #[cfg(feature = "failpoints")]
            corrupt_next: false,
        })
    }

    /// Fault injection for tests: one byte of the next record sealed is
    /// flipped on its way out, as a bad link would do.
    #[cfg(feature = "failpoints")]
    pub fn corrupt_next_record(&mut self) {
        self.corrupt_next = true;
    }

    /// Appends `content` to `out` as records of `content_type`.
    fn seal(&mut self, content: &[u8], content_type: u8) -> io::Result<()> {
        let mut pieces = content.chunks(MAX_PLAINTEXT).peekable();
        if pieces.peek().is_none() {
            return Ok(());
        }
        for piece in pieces {
            let start = self.out.len();
            let head = header(piece.len() + 1 + TAG_LEN);
            self.out.extend_from_slice(&head);
            self.out.extend_from_slice(piece);
            self.out.push(content_type);
            let nonce = self.dir.next_nonce()?;
            let tag = self
                .dir
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(head), &mut self.out[start + HEADER_LEN..])
                .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
            self.out.extend_from_slice(tag.as_ref());
            #[cfg(feature = "failpoints")]
            if std::mem::take(&mut self.corrupt_next) {
                self.out[start + HEADER_LEN] ^= 0x01;
            }
        }
        Ok(())
    }

    /// Sends all of `data` on `inner`.
    pub fn write_all_to<W: Write>(&mut self, inner: &mut W, data: &[u8]) -> io::Result<()> {
        self.out.clear();
        self.seal(data, APPLICATION_DATA)?;
        inner.write_all(&self.out)
    }

    /// Sends a close_notify alert: the peer's reader then ends cleanly.
    pub fn close_notify<W: Write>(&mut self, inner: &mut W) -> io::Result<()> {
        self.out.clear();
        // Alert level warning (1), description close_notify.
        self.seal(&[1, CLOSE_NOTIFY], ALERT)?;
        inner.write_all(&self.out)
    }
}

/// Reads records from `inner`, opens them in place and hands out the
/// plaintext.
pub struct RecordReader<R: Read> {
    inner: R,
    dir: Direction,
    buf: Vec<u8>,
    /// Bytes read but not yet opened.
    pending: Range<usize>,
    /// Opened plaintext not yet handed out.
    plain: Range<usize>,
    /// A close_notify arrived: nothing more follows.
    closed: bool,
}

impl<R: Read> RecordReader<R> {
    /// `seq` and `secrets` are the receive half of rustls's extracted secrets.
    pub fn new(inner: R, seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        Ok(Self {
            inner,
            dir: Direction::new(seq, secrets)?,
            buf: vec![0u8; READ_BUFFER + HEADER_LEN + MAX_CIPHERTEXT],
            pending: 0..0,
            plain: 0..0,
            closed: false,
        })
    }

    /// Opens the record at the start of `pending`, if it is all there.
    fn open_next(&mut self) -> io::Result<bool> {
        let avail = &self.buf[self.pending.clone()];
        if avail.len() < HEADER_LEN {
            return Ok(false);
        }
        let head: [u8; HEADER_LEN] = avail[..HEADER_LEN].try_into().expect("length checked");
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        if head[0] != APPLICATION_DATA {
            return Err(invalid(format!("TLS record of outer type {} after the handshake", head[0])));
        }
        if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!("TLS record length {len} out of range")));
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(false);
        }
        let body = self.pending.start + HEADER_LEN..self.pending.start + HEADER_LEN + len;
        self.pending.start = body.end;
        let nonce = self.dir.next_nonce()?;
        let opened = self
            .dir
            .key
            .open_in_place(nonce, Aad::from(head), &mut self.buf[body.clone()])
            .map_err(|_| invalid("a TLS record failed authentication (corrupted, replayed or forged)".into()))?;
        // The real type is the last byte that is not padding.
        let Some(type_at) = opened.iter().rposition(|b| *b != 0) else {
            return Err(invalid("a TLS record without a content type".into()));
        };
        let content_type = opened[type_at];
        let content = body.start..body.start + type_at;
        match content_type {
            APPLICATION_DATA => self.plain = content,
            ALERT if self.buf[content.clone()].get(1) == Some(&CLOSE_NOTIFY) => self.closed = true,
            ALERT => return Err(invalid(format!("the peer sent TLS alert {:?}", &self.buf[content]))),
            HANDSHAKE => return Err(invalid("unexpected TLS handshake message after the handshake".into())),
            other => return Err(invalid(format!("TLS record of content type {other}"))),
        }
        Ok(true)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> Read for RecordReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.plain.is_empty() {
                let n = out.len().min(self.plain.len());
                out[..n].copy_from_slice(&self.buf[self.plain.start..self.plain.start + n]);
                self.plain.start += n;
                return Ok(n);
            }
            if self.closed || out.is_empty() {
                return Ok(0);
            }
            if self.open_next()? {
                continue;
            }
            // Need more bytes: keep the partial record, at the front once
            // the buffer's tail has no room for a whole one.
            if self.buf.len() - self.pending.end < HEADER_LEN + MAX_CIPHERTEXT {
                let len = self.pending.len();
                self.buf.copy_within(self.pending.clone(), 0);
                self.pending = 0..len;
            }
            let end = self.pending.end;
            let n = self.inner.read(&mut self.buf[end..])?;
            if n == 0 {
                return if self.pending.is_empty() {
                    // The protocol above knows whether this end was due.
                    Ok(0)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended inside a TLS record"))
                };
            }
            self.pending.end += n;
        }
    }
}

/// Hands rustls the peer's bytes one TLS record at a time (a header, then
/// at most that record's body), so that a read during the handshake never
/// takes in the first record after it: those are a [`RecordReader`]'s.
pub struct OneRecordAtATime<R: Read> {
    inner: R,
    /// Bytes of the current record's body not yet handed over.
    left: usize,
}

impl<R: Read> OneRecordAtATime<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, left: 0 }
    }
}

impl<R: Read> Read for OneRecordAtATime<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut head = [0u8; HEADER_LEN];
            let mut got = 0;
            while got < HEADER_LEN {
                match self.inner.read(&mut head[got..])? {
                    0 if got == 0 => return Ok(0),
                    0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended inside a TLS record header")),
                    n => got += n,
                }
            }
            if buf.len() < HEADER_LEN {
                return Err(io::Error::other("TLS read buffer smaller than a record header"));
            }
            buf[..HEADER_LEN].copy_from_slice(&head);
            self.left = u16::from_be_bytes([head[3], head[4]]) as usize;
            return Ok(HEADER_LEN);
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(byte: u8) -> ConnectionTrafficSecrets {
        // AeadKey::from takes its largest size, 32 bytes: AES-256's.
        ConnectionTrafficSecrets::Aes256Gcm { key: [byte; 32].into(), iv: [byte ^ 0x55; 12].into() }
    }

    fn sealed(data: &[u8]) -> Vec<u8> {
        let mut w = RecordWriter::new(7, secrets(1)).unwrap();
        let mut wire = Vec::new();
        w.write_all_to(&mut wire, data).unwrap();
        wire
    }

    fn read_all(wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = RecordReader::new(wire, 7, secrets(1))?;
        let mut got = Vec::new();
        r.read_to_end(&mut got)?;
        Ok(got)
    }

    #[test]
    fn records_carry_data_of_any_length() {
        for len in [0, 1, MAX_PLAINTEXT - 1, MAX_PLAINTEXT, MAX_PLAINTEXT + 1, 3 * READ_BUFFER + 12345] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = sealed(&data);
            assert_eq!(wire.len(), len + len.div_ceil(MAX_PLAINTEXT) * (HEADER_LEN + 1 + TAG_LEN));
            assert!(read_all(&wire).unwrap() == data, "length {len}");
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let data = vec![9u8; 2 * MAX_PLAINTEXT + 10];
        let wire = sealed(&data);
        for at in [0, 3, 4, HEADER_LEN, HEADER_LEN + 100, wire.len() / 2, wire.len() - 1] {
            let mut bad = wire.clone();
            bad[at] ^= 0x10;
            assert!(read_all(&bad).is_err(), "byte {at} flipped went unnoticed");
        }
    }

    #[test]
    fn replayed_reordered_or_truncated_records_are_refused() {
        let wire = sealed(&[5u8; 3 * MAX_PLAINTEXT]);
        let rec = HEADER_LEN + MAX_PLAINTEXT + 1 + TAG_LEN;
        let (first, second) = (&wire[..rec], &wire[rec..2 * rec]);
        assert!(read_all(&[first, first].concat()).is_err(), "replayed");
        assert!(read_all(&[second, first].concat()).is_err(), "reordered");
        assert!(read_all(&wire[..wire.len() - 1]).is_err(), "cut inside a record");
        // Cut at a record boundary: a clean end, which the protocol above
        // (ImagesDone, Commit) judges.
        assert_eq!(read_all(&wire[..rec]).unwrap().len(), MAX_PLAINTEXT);
    }

    #[test]
    fn wrong_keys_and_hostile_headers_are_refused() {
        let wire = sealed(b"hello");
        let mut r = RecordReader::new(&wire[..], 7, secrets(2)).unwrap();
        assert!(r.read(&mut [0u8; 16]).is_err(), "another key");
        let mut r = RecordReader::new(&wire[..], 8, secrets(1)).unwrap();
        assert!(r.read(&mut [0u8; 16]).is_err(), "another sequence number");
        let mut huge = wire.clone();
        huge[3] = 0xff;
        assert!(read_all(&huge).unwrap_err().to_string().contains("out of range"));
        let mut handshake = wire.clone();
        handshake[0] = HANDSHAKE;
        assert!(read_all(&handshake).is_err());
    }

    #[test]
    #[cfg(feature = "failpoints")]
    fn injected_corruption_damages_one_record() {
        let mut w = RecordWriter::new(7, secrets(1)).unwrap();
        let mut wire = Vec::new();
        w.write_all_to(&mut wire, b"intact").unwrap();
        w.corrupt_next_record();
        w.write_all_to(&mut wire, b"damaged").unwrap();
        let mut r = RecordReader::new(&wire[..], 7, secrets(1)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).unwrap(), 6);
        assert!(r.read(&mut buf).unwrap_err().to_string().contains("failed authentication"));
    }

    #[test]
    fn close_notify_ends_the_stream_and_nothing_after_it_is_read() {
        let mut w = RecordWriter::new(0, secrets(3)).unwrap();
        let mut wire = Vec::new();
        w.write_all_to(&mut wire, b"before").unwrap();
        w.close_notify(&mut wire).unwrap();
        w.write_all_to(&mut wire, b"after").unwrap();
        let mut r = RecordReader::new(&wire[..], 0, secrets(3)).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"before");
    }
}
