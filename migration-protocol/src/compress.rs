//! Per-frame zstd compression that switches itself off when it does not pay.

use crate::frame::{FrameWriter, MessageKind};
use crate::ProtocolError;

/// `--compress` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionMode {
    /// Compress while it saves at least [`MIN_SAVING`]; stop trying for a
    /// while after a run of chunks that did not compress.
    #[default]
    Auto,
    Always,
    Never,
}

/// A chunk is sent compressed only if that saves at least this fraction.
const MIN_SAVING: f64 = 0.10;
/// After this many chunks in a row that did not compress...
const GIVE_UP_AFTER: u32 = 4;
/// ...this many chunks go out raw before one is tried again; each trial
/// that fails doubles the wait, up to MAX_BACKOFF_CHUNKS, so that memory
/// that never compresses costs a few trials per gigabyte, not one in 17.
const BACKOFF_CHUNKS: u32 = 64;
const MAX_BACKOFF_CHUNKS: u32 = 1024;
const ZSTD_LEVEL: i32 = 1;

/// Decides, chunk by chunk, whether compression pays.
pub struct Compressor {
    mode: CompressionMode,
    misses: u32,
    skip: u32,
    /// The current wait between trials; 0 while compression pays.
    backoff: u32,
    trials: u64,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(mode: CompressionMode) -> Self {
        Self {
            mode,
            misses: 0,
            skip: 0,
            backoff: 0,
            trials: 0,
            compressor: None,
        }
    }

    /// Chunks compressed so far, whether or not that paid.
    pub fn trials(&self) -> u64 {
        self.trials
    }

    /// Sends `data` as one frame of `kind`, compressed if that pays.
    pub fn write<W: std::io::Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        kind: MessageKind,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        self.write_inner(out, kind, data, None)
    }

    /// Like [`write`](Self::write), given `data_crc`, the CRC-32C of `data`,
    /// used for the frame's checksum if `data` goes out raw.
    pub fn write_with_crc<W: std::io::Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        kind: MessageKind,
        data: &[u8],
        data_crc: u32,
    ) -> Result<(), ProtocolError> {
        self.write_inner(out, kind, data, Some(data_crc))
    }

    fn write_inner<W: std::io::Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        kind: MessageKind,
        data: &[u8],
        data_crc: Option<u32>,
    ) -> Result<(), ProtocolError> {
        let raw = |out: &mut FrameWriter<W>| match data_crc {
            Some(crc) => out.write_encoded_with_crc(kind, data, data.len(), false, crc),
            None => out.write_encoded(kind, data, data.len(), false),
        };
        if self.mode == CompressionMode::Never || data.len() < 512 {
            return raw(out);
        }
        if self.mode == CompressionMode::Auto && self.skip > 0 {
            self.skip -= 1;
            return raw(out);
        }
        let c = self.compressor.get_or_insert_with(|| {
            zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd compressor at level 1")
        });
        self.trials += 1;
        let packed = c.compress(data)?;
        let pays = (packed.len() as f64) <= (data.len() as f64) * (1.0 - MIN_SAVING);
        if pays || self.mode == CompressionMode::Always {
            self.misses = 0;
            self.backoff = 0;
            out.write_encoded(kind, &packed, data.len(), true)
        } else {
            self.misses += 1;
            if self.backoff > 0 {
                // A trial after a wait failed: wait longer.
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF_CHUNKS);
                self.skip = self.backoff;
            } else if self.misses >= GIVE_UP_AFTER {
                self.backoff = BACKOFF_CHUNKS;
                self.skip = self.backoff;
            }
            raw(out)
        }
    }
}

pub(crate) fn decompress(kind: MessageKind, wire: &[u8], raw_len: u32) -> Result<Vec<u8>, ProtocolError> {
    // The header's raw_len (already bounded by MAX_PAYLOAD) caps the output,
    // so a small frame cannot expand into unbounded memory.
    let out = zstd::bulk::decompress(wire, raw_len as usize).map_err(|e| ProtocolError::Decompress {
        kind,
        reason: e.to_string(),
    })?;
    if out.len() != raw_len as usize {
        return Err(ProtocolError::SizeMismatch {
            kind,
            expected: raw_len,
            actual: out.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn incompressible_data_is_tried_rarely_and_compressible_data_wins_it_back() {
        let mut w = FrameWriter::new(std::io::sink());
        let mut c = Compressor::new(CompressionMode::Auto);
        let random = noise(4096, 7);
        for _ in 0..2048 {
            c.write(&mut w, MessageKind::ImageData, &random).unwrap();
        }
        // 4 misses, then one trial after waits of 64, 128, 256, 512 and
        // then every 1024 chunks: 9 in 2048 chunks (one in 17 before).
        assert!(c.trials() <= 10, "{} trials for 2048 incompressible chunks", c.trials());
        assert!(c.trials() >= 5, "compression must still be retried: {}", c.trials());

        // Memory that compresses again is noticed within the longest wait,
        // and from then on every chunk is compressed.
        let zeros = vec![0u8; 4096];
        let before = c.trials();
        let mut sent = 0;
        while c.trials() == before {
            c.write(&mut w, MessageKind::ImageData, &zeros).unwrap();
            sent += 1;
            assert!(sent <= MAX_BACKOFF_CHUNKS + 1, "compressible data never tried again");
        }
        let at = c.trials();
        for _ in 0..10 {
            c.write(&mut w, MessageKind::ImageData, &zeros).unwrap();
        }
        assert_eq!(c.trials(), at + 10);
    }
}
