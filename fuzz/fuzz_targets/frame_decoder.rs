//! Arbitrary bytes as a migration stream: the frame reader and every
//! payload decoder a receiver runs must reject garbage without panicking,
//! hanging or allocating past their limits.
//!
//! Random bytes rarely carry a valid CRC-32C, which would keep the fuzzer
//! at the header checks; so when the first byte is odd, the rest is cut
//! into (kind, flags, payload) pieces sent as frames with correct headers
//! and checksums, to reach the decompressor and the payload decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_protocol::frame::encode_header;
use migration_protocol::*;

fn well_formed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let kind = MessageKind::from_u16(1 + (rest[0] as u16 % 15)).unwrap_or(MessageKind::RootfsData);
        let compressed = rest[1] & 1 == 1;
        let len = (u16::from_le_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
        let payload = &rest[4..4 + len];
        // A compressed frame declares some decompressed size; let the input
        // choose it, bounded like a real header.
        let raw_len = if compressed { (payload.len() as u32).saturating_mul(3) } else { payload.len() as u32 };
        out.extend_from_slice(&encode_header(kind, payload, raw_len, compressed));
        out.extend_from_slice(payload);
        rest = &rest[4 + len..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let stream = match data.split_first() {
        Some((b, rest)) if b & 1 == 1 => well_formed(rest),
        _ => data.to_vec(),
    };
    let mut reader = FrameReader::new(&stream[..]).with_limit(32 << 20);
    for _ in 0..256 {
        let Ok(frame) = reader.read_frame() else { break };
        match frame.kind {
            MessageKind::ImageData => {
                let _ = ImageData::decode(&frame.payload);
            }
            MessageKind::Hello => {
                if let Ok(h) = frame.json::<Hello>() {
                    let _ = negotiate_version(h.min_version, h.max_version);
                }
            }
            MessageKind::Manifest => {
                let _ = frame.json::<Manifest>();
            }
            MessageKind::RootfsEnd => {
                let _ = frame.json::<RootfsEnd>();
            }
            MessageKind::ImagesDone => {
                let _ = frame.json::<ImagesDone>();
            }
            MessageKind::RoundBegin => {
                let _ = frame.json::<RoundBegin>();
            }
            MessageKind::RoundDone => {
                let _ = frame.json::<RoundDone>();
            }
            MessageKind::Error => {
                let _ = frame.json::<ErrorMessage>();
            }
            _ => {}
        }
    }
});
