//! Per-frame zstd compression that switches itself off when it does not pay.

use crate::frame::{FrameWriter, MessageKind};
use crate::ProtocolError;

/// `--compress` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionMode {
    /// Compress while it pays: it saves at least [`MIN_SAVING`] of the
    /// bytes, and compressing a chunk takes less time than sending the
    /// bytes it saves would (on a link faster than zstd, it does not). Stop
    /// trying for a while after a run of chunks for which it did not pay.
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

/// Weight of each frame in the send cost averages: the last 8 or so
/// frames count, raw or compressed alike (averaged per frame, not per
/// byte, so that after a switch the small compressed frames are not
/// outweighed by the large raw ones before them).
const SEND_WEIGHT: f64 = 0.125;
/// A frame whose write took this many times the CPU time it used waited
/// for the link (or the peer): its time per byte is the link's.
const BLOCKED_FACTOR: f64 = 2.0;
/// Weight of each new trial in the compression cost and ratio averages.
const TRIAL_WEIGHT: f64 = 0.25;
/// While compression compresses but costs more than it saves, one chunk
/// in this many is compressed anyway, to keep its cost and ratio current.
const COST_RECHECK_CHUNKS: u32 = 32;

/// Decides, chunk by chunk, whether compression pays.
pub struct Compressor {
    mode: CompressionMode,
    misses: u32,
    skip: u32,
    /// The current wait between trials; 0 while compression pays.
    backoff: u32,
    trials: u64,
    compressed: u64,
    /// Averages over recent frames, per byte on the wire: the CPU time
    /// a write takes (sealing, copies, the socket), and the wall time of
    /// writes that had to wait (the link, the peer or a throttle: what the
    /// link allows; two in a row, so that one preempted write does not
    /// count), each write that did not wait counting as nothing. No waits
    /// seen: the link keeps up with this process.
    cpu_cost: Option<f64>,
    link_cost: Option<f64>,
    /// Whether the last timed write waited.
    last_write_waited: bool,
    /// Averages over recent trials: zstd's time per input byte, and the
    /// compressed size over the raw size.
    trial_costs: Option<TrialCosts>,
    /// Chunks sent raw on cost since the last trial.
    raw_on_cost: u32,
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
            compressed: 0,
            cpu_cost: None,
            link_cost: None,
            // The first write that waits is believed: no slow link is
            // noticed late for want of a second.
            last_write_waited: true,
            trial_costs: None,
            raw_on_cost: 0,
            compressor: None,
        }
    }

    /// Chunks compressed so far, whether or not that paid.
    pub fn trials(&self) -> u64 {
        self.trials
    }

    /// Frames sent compressed so far.
    pub fn compressed_frames(&self) -> u64 {
        self.compressed
    }

    /// Writes one frame with `write`, timing it into the send costs (in
    /// auto mode: only its decisions read them).
    fn timed<W: std::io::Write, F>(&mut self, out: &mut FrameWriter<W>, wire_len: usize, write: F) -> Result<(), ProtocolError>
    where
        F: FnOnce(&mut FrameWriter<W>) -> Result<(), ProtocolError>,
    {
        if self.mode != CompressionMode::Auto {
            return write(out);
        }
        let (wall_started, cpu_started) = (std::time::Instant::now(), thread_cpu_ns());
        write(out)?;
        let (wall, cpu) = (wall_started.elapsed().as_nanos() as f64, thread_cpu_ns() - cpu_started);
        let bytes = wire_len.max(1) as f64;
        self.cpu_cost = Some(moving_average(self.cpu_cost, cpu / bytes, SEND_WEIGHT));
        let waited = wall > cpu * BLOCKED_FACTOR;
        // A link holds every write back; a lone write that waited was this
        // thread being descheduled, and must not stand for the link. A
        // write that did not wait says the link kept up: it pulls the
        // link's cost towards nothing, so that waits that were this thread
        // descheduled twice in a row fade within a few frames.
        if !waited {
            if self.link_cost.is_some() {
                self.link_cost = Some(moving_average(self.link_cost, 0.0, SEND_WEIGHT));
            }
        } else if self.last_write_waited {
            self.link_cost = Some(moving_average(self.link_cost, wall / bytes, SEND_WEIGHT));
        }
        self.last_write_waited = waited;
        Ok(())
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
        let raw = |this: &mut Self, out: &mut FrameWriter<W>| {
            this.timed(out, data.len(), |out| match data_crc {
                Some(crc) => out.write_encoded_with_crc(kind, data, data.len(), false, crc),
                None => out.write_encoded(kind, data, data.len(), false),
            })
        };
        if self.mode == CompressionMode::Never || data.len() < 512 {
            return raw(self, out);
        }
        if self.mode == CompressionMode::Auto {
            if self.skip > 0 {
                self.skip -= 1;
                return raw(self, out);
            }
            if !self.compression_pays() && self.raw_on_cost < COST_RECHECK_CHUNKS {
                self.raw_on_cost += 1;
                return raw(self, out);
            }
        }
        self.raw_on_cost = 0;
        let c = self.compressor.get_or_insert_with(|| {
            zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd compressor at level 1")
        });
        self.trials += 1;
        let started = std::time::Instant::now();
        let packed = c.compress(data)?;
        let ns_per_byte = started.elapsed().as_nanos() as f64 / data.len() as f64;
        let ratio = packed.len() as f64 / data.len() as f64;
        let before = self.trial_costs;
        self.trial_costs = Some(TrialCosts {
            compress_ns_per_byte: moving_average(before.map(|t| t.compress_ns_per_byte), ns_per_byte, TRIAL_WEIGHT),
            packed_ratio: moving_average(before.map(|t| t.packed_ratio), ratio, TRIAL_WEIGHT),
        });
        if ratio <= 1.0 - MIN_SAVING || self.mode == CompressionMode::Always {
            self.misses = 0;
            self.backoff = 0;
            self.compressed += 1;
            return self.timed(out, packed.len(), |out| out.write_encoded(kind, &packed, data.len(), true));
        }
        // Memory that does not compress: try again less and less often.
        self.misses += 1;
        if self.backoff > 0 {
            // A trial after a wait failed: wait longer.
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF_CHUNKS);
            self.skip = self.backoff;
        } else if self.misses >= GIVE_UP_AFTER {
            self.backoff = BACKOFF_CHUNKS;
            self.skip = self.backoff;
        }
        raw(self, out)
    }

    /// Whether compressing saves time, by the averages. Per input byte,
    /// sending raw takes the longer of the CPU cost and the link's;
    /// compressed, the longer of zstd's time plus the CPU cost of what is
    /// left, and the link's cost of what is left. Until a frame has been
    /// timed and a chunk compressed, it is taken to pay.
    fn compression_pays(&self) -> bool {
        let (Some(cpu), Some(t)) = (self.cpu_cost, self.trial_costs) else {
            return true;
        };
        let link = self.link_cost.unwrap_or(0.0);
        let raw = cpu.max(link);
        let packed = (t.compress_ns_per_byte + cpu * t.packed_ratio).max(link * t.packed_ratio);
        packed < raw
    }
}

/// `average` moved towards `sample` by `weight`; the sample alone if
/// there is no average yet.
fn moving_average(average: Option<f64>, sample: f64, weight: f64) -> f64 {
    average.map_or(sample, |a| a + (sample - a) * weight)
}

/// CPU time this thread has used, in ns.
fn thread_cpu_ns() -> f64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0.0, |t| t.tv_sec() as f64 * 1e9 + t.tv_nsec() as f64)
}

#[derive(Debug, Clone, Copy)]
struct TrialCosts {
    compress_ns_per_byte: f64,
    packed_ratio: f64,
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

    /// These tests time real writes and real compression: run one at a
    /// time, so that they do not take each other's CPU and look like a
    /// link that waits or a copy that costs.
    fn timing_alone() -> std::sync::MutexGuard<'static, ()> {
        static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        TIMING.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A link of `ns_per_byte`: each write waits as long as its bytes
    /// would take to cross it.
    struct Link {
        ns_per_byte: u64,
    }
    impl std::io::Write for Link {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_nanos(self.ns_per_byte * buf.len() as u64));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Text-like data: compresses to well under half, at zstd's usual
    /// speed (not the speed of a run of zeros).
    fn text(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: [&str; 8] = ["page ", "frozen ", "restore ", "memory ", "image ", "socket ", "cgroup ", "dump "];
        let noise = noise(len, seed);
        let mut out = Vec::with_capacity(len + 8);
        let mut i = 0;
        while out.len() < len {
            out.extend_from_slice(WORDS[(noise[i % len] % 8) as usize].as_bytes());
            if noise[(i + 1) % len].is_multiple_of(4) {
                out.push(b'0' + noise[(i + 2) % len] % 10);
            }
            i += 3;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn incompressible_data_is_tried_rarely_and_compressible_data_wins_it_back() {
        let _alone = timing_alone();
        // 10 MB/s: compressing saves time wherever it saves bytes.
        let mut w = FrameWriter::new(Link { ns_per_byte: 100 });
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
        let at = c.compressed_frames();
        for _ in 0..10 {
            c.write(&mut w, MessageKind::ImageData, &zeros).unwrap();
        }
        assert_eq!(c.compressed_frames(), at + 10);
    }

    #[test]
    fn compression_pays_over_a_slow_link() {
        let _alone = timing_alone();
        let mut w = FrameWriter::new(Link { ns_per_byte: 100 });
        let mut c = Compressor::new(CompressionMode::Auto);
        let chunk = text(256 << 10, 3);
        for _ in 0..32 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        assert_eq!(c.compressed_frames(), 32, "at 10 MB/s every chunk of text is worth compressing");
    }

    #[test]
    fn compression_follows_the_link_when_it_slows_down() {
        let _alone = timing_alone();
        let mut w = FrameWriter::new(Link { ns_per_byte: 0 });
        let mut c = Compressor::new(CompressionMode::Auto);
        let chunk = text(256 << 10, 9);
        for _ in 0..64 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        let on_fast_link = c.compressed_frames();
        // The first, two rechecks, and room for this machine's noise (a
        // write that waited twice while this thread was descheduled):
        // compressing every chunk, as without the cost model, is 64.
        assert!(on_fast_link <= 12, "{on_fast_link} of 64 chunks compressed over a link faster than zstd");
        // The link drops to 10 MB/s: within a few chunks every chunk is
        // compressed (the send cost is an average over recent frames).
        w.get_mut().ns_per_byte = 100;
        for _ in 0..8 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        let before = c.compressed_frames();
        for _ in 0..16 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        assert_eq!(c.compressed_frames(), before + 16, "compression did not come back on a slow link: {:?} {:?} {:?}", c.trial_costs, c.cpu_cost, c.link_cost);
    }

    /// A fast link that holds back the first `hiccups` writes by 5 ms each,
    /// as a descheduled sender would see.
    struct Hiccup {
        hiccups: u32,
    }
    impl std::io::Write for Hiccup {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.hiccups > 0 {
                self.hiccups -= 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn waits_that_were_not_the_link_fade() {
        let _alone = timing_alone();
        // The first frame waits (its header and its payload each 5 ms; the
        // first timed write counts alone), then the link keeps up.
        let mut w = FrameWriter::new(Hiccup { hiccups: 2 });
        let mut c = Compressor::new(CompressionMode::Auto);
        let chunk = text(256 << 10, 11);
        for _ in 0..32 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        let before = c.compressed_frames();
        for _ in 0..32 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        let late = c.compressed_frames() - before;
        assert!(late <= 6, "{late} of the last 32 chunks compressed: the link's cost from two waits never faded ({:?})", c.link_cost);
    }

    #[test]
    fn compression_stays_off_over_a_link_faster_than_zstd() {
        let _alone = timing_alone();
        // Writes cost nothing but the frame's checksum: zstd, at well under
        // the speed of a memory copy, costs more than the bytes it saves.
        let mut w = FrameWriter::new(std::io::sink());
        let mut c = Compressor::new(CompressionMode::Auto);
        let chunk = text(256 << 10, 5);
        assert!(zstd::bulk::compress(&chunk, ZSTD_LEVEL).unwrap().len() < chunk.len() / 2, "the data compresses");
        for _ in 0..512 {
            c.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        // The first, then one in 33 to see whether that changed (17), with
        // room for this machine's noise; without the cost model all 512.
        assert!(c.trials() <= 48, "{} trials for chunks not worth compressing", c.trials());
        // `always` is not second-guessed.
        let mut always = Compressor::new(CompressionMode::Always);
        for _ in 0..4 {
            always.write(&mut w, MessageKind::ImageData, &chunk).unwrap();
        }
        assert_eq!(always.compressed_frames(), 4);
    }
}
