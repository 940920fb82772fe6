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
/// ...this many chunks go out raw before compression is tried again.
const BACKOFF_CHUNKS: u32 = 64;
const ZSTD_LEVEL: i32 = 1;

/// Decides, chunk by chunk, whether compression pays.
pub struct Compressor {
    mode: CompressionMode,
    misses: u32,
    skip: u32,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(mode: CompressionMode) -> Self {
        Self {
            mode,
            misses: 0,
            skip: 0,
            compressor: None,
        }
    }

    /// Sends `data` as one frame of `kind`, compressed if that pays.
    pub fn write<W: std::io::Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        kind: MessageKind,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        if self.mode == CompressionMode::Never || data.len() < 512 {
            return out.write_encoded(kind, data, data.len(), false);
        }
        if self.mode == CompressionMode::Auto && self.skip > 0 {
            self.skip -= 1;
            return out.write_encoded(kind, data, data.len(), false);
        }
        let c = self.compressor.get_or_insert_with(|| {
            zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd compressor at level 1")
        });
        let packed = c.compress(data)?;
        let pays = (packed.len() as f64) <= (data.len() as f64) * (1.0 - MIN_SAVING);
        if pays || self.mode == CompressionMode::Always {
            self.misses = 0;
            out.write_encoded(kind, &packed, data.len(), true)
        } else {
            self.misses += 1;
            if self.misses >= GIVE_UP_AFTER {
                self.misses = 0;
                self.skip = BACKOFF_CHUNKS;
            }
            out.write_encoded(kind, data, data.len(), false)
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
