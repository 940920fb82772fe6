//! Frame codec: round trips, and each malformed frame refused with its error.

use migration_protocol::frame::{encode_header, MAX_PAYLOAD};
use migration_protocol::*;

fn encode(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    w.write_frame(kind, payload).unwrap();
    w.get_ref().clone()
}

fn read_one(bytes: &[u8]) -> Result<Frame, ProtocolError> {
    FrameReader::new(bytes).read_frame()
}

#[test]
fn control_messages_round_trip() {
    let manifest = Manifest {
        migration_id: "0123456789abcdef".into(),
        container_id: "web".into(),
        dest_id: "web2".into(),
        oci_config: serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]}}),
        criu_version: "4.2.1".into(),
        kernel: "6.18.0".into(),
        arch: "x86_64".into(),
        cgroup_version: 1,
        mode: "stop-copy".into(),
        max_rounds: 0,
        tcp_established: false,
        network: None,
            memory_bytes: 0,
            empty_tmpfs: Vec::new(),
            pod: None,
        source_host: "a".into(),
    };
    let mut w = FrameWriter::new(Vec::new());
    w.write_json(MessageKind::Manifest, &manifest).unwrap();
    w.write_json(MessageKind::Abort, &Abort { reason: "x".into() }).unwrap();
    let bytes = w.get_ref().clone();
    let mut r = FrameReader::new(&bytes[..]);
    let f = r.read_frame().unwrap();
    assert_eq!(f.kind, MessageKind::Manifest);
    assert_eq!(f.json::<Manifest>().unwrap(), manifest);
    let f = r.read_frame().unwrap();
    assert_eq!(f.json::<Abort>().unwrap().reason, "x");
    assert!(matches!(r.read_frame(), Err(ProtocolError::Closed)));
    assert_eq!(r.wire_bytes, bytes.len() as u64);
}

#[test]
fn compressed_and_raw_chunks_round_trip() {
    let compressible = vec![7u8; 1 << 20];
    // xorshift noise does not compress: auto mode must send it raw.
    let mut x = 0x1234_5678_9abc_def0u64;
    let noise: Vec<u8> = (0..(1 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut w = FrameWriter::new(Vec::new());
    let mut c = Compressor::new(CompressionMode::Auto);
    c.write(&mut w, MessageKind::RootfsData, &compressible).unwrap();
    let after_first = w.wire_bytes;
    c.write(&mut w, MessageKind::RootfsData, &noise).unwrap();
    assert!(after_first < 64 * 1024, "1 MiB of one byte should compress well, took {after_first}");
    assert!(w.wire_bytes - after_first >= noise.len() as u64, "noise must go raw");
    assert_eq!(w.raw_bytes, 2 << 20);
    let bytes = w.get_ref().clone();
    let mut r = FrameReader::new(&bytes[..]);
    assert_eq!(r.read_frame().unwrap().payload, compressible);
    assert_eq!(r.read_frame().unwrap().payload, noise);
}

#[test]
fn recycled_payload_buffers_carry_each_frame_exactly() {
    // Larger, smaller, equal and larger again than the buffer handed back,
    // each filled with a byte of its own: nothing of a frame may show
    // through in the next.
    let sizes = [1 << 20, 100, 0, 100, 70_000, 1 << 20, (1 << 20) + 9];
    let mut w = FrameWriter::new(Vec::new());
    for (i, len) in sizes.iter().enumerate() {
        w.write_frame(MessageKind::ImageData, &vec![i as u8 + 1; *len]).unwrap();
    }
    let bytes = w.get_ref().clone();
    let mut r = FrameReader::new(&bytes[..]);
    for (i, len) in sizes.iter().enumerate() {
        let f = r.read_frame().unwrap();
        assert_eq!(f.payload.len(), *len, "frame {i}");
        assert!(f.payload.iter().all(|b| *b == i as u8 + 1), "frame {i} has bytes of another");
        assert_eq!(f.payload_crc, Some(crc32c::crc32c(&f.payload)), "frame {i}");
        r.recycle(f);
    }
    assert!(matches!(r.read_frame(), Err(ProtocolError::Closed)));
}

#[test]
fn image_data_round_trip_and_bounds() {
    let d = ImageData { name: "pages-1.img", offset: 1 << 33, data: b"abc" };
    let mut buf = Vec::new();
    d.encode(&mut buf);
    assert_eq!(ImageData::decode(&buf).unwrap(), d);
    assert!(ImageData::decode(&buf[..5]).is_err());
    assert!(ImageData::decode(&[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).is_err(), "empty name");
}

#[test]
fn truncated_frame_is_refused() {
    let bytes = encode(MessageKind::Commit, b"payload");
    assert!(matches!(read_one(&bytes[..10]), Err(ProtocolError::Truncated(_))));
    assert!(matches!(read_one(&bytes[..bytes.len() - 1]), Err(ProtocolError::Truncated(_))));
    assert!(matches!(read_one(&[]), Err(ProtocolError::Closed)));
}

#[test]
fn wrong_magic_is_refused() {
    let mut bytes = encode(MessageKind::Commit, b"");
    bytes[0..4].copy_from_slice(b"HTTP");
    assert!(matches!(read_one(&bytes), Err(ProtocolError::BadMagic(_))));
}

#[test]
fn wrong_frame_version_is_refused() {
    let mut bytes = encode(MessageKind::Commit, b"");
    bytes[4] = 9;
    match read_one(&bytes) {
        Err(ProtocolError::UnsupportedFrameVersion { got: 9, supported: 1 }) => {}
        other => panic!("expected a version error, got {other:?}"),
    }
}

#[test]
fn oversized_frame_is_refused_before_allocation() {
    // A header claiming 4 GiB - 1 of payload, with nothing behind it.
    let mut h = encode_header(MessageKind::RootfsData, b"", 0, false);
    h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    match read_one(&h) {
        Err(ProtocolError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as u64);
            assert_eq!(max, MAX_PAYLOAD as u64);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    let mut w = FrameWriter::new(Vec::new());
    let big = vec![0u8; MAX_PAYLOAD as usize + 1];
    assert!(matches!(
        w.write_frame(MessageKind::RootfsData, &big),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}

#[test]
fn checksum_mismatch_is_refused() {
    let mut bytes = encode(MessageKind::RootfsData, b"some rootfs bytes");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    assert!(matches!(read_one(&bytes), Err(ProtocolError::ChecksumMismatch { .. })));
    // A flipped header bit (here the kind) is caught too.
    let mut bytes = encode(MessageKind::RootfsData, b"x");
    bytes[6] = MessageKind::ImageData as u8;
    assert!(matches!(read_one(&bytes), Err(ProtocolError::ChecksumMismatch { .. })));
}

#[test]
fn decompression_bomb_is_capped_by_header() {
    // A valid zstd frame of 1 MiB of zeros, declared as 100 bytes raw.
    let packed = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
    let h = encode_header(MessageKind::RootfsData, &packed, 100, true);
    let mut bytes = h.to_vec();
    bytes.extend_from_slice(&packed);
    assert!(matches!(read_one(&bytes), Err(ProtocolError::Decompress { .. } | ProtocolError::SizeMismatch { .. })));
}

#[test]
fn unknown_kind_and_flags_are_refused() {
    let mut h = encode_header(MessageKind::Commit, b"", 0, false);
    h[6..8].copy_from_slice(&999u16.to_le_bytes());
    assert!(matches!(read_one(&h), Err(ProtocolError::UnknownKind(999))));
    let mut h = encode_header(MessageKind::Commit, b"", 0, false);
    h[8..12].copy_from_slice(&0x80u32.to_le_bytes());
    assert!(matches!(read_one(&h), Err(ProtocolError::UnknownFlags(0x80))));
}

#[test]
fn version_negotiation() {
    assert_eq!(negotiate_version(1, 7).unwrap(), PROTOCOL_VERSION_MAX);
    assert_eq!(negotiate_version(1, 6).unwrap(), 6, "a version-6 sender is still served (pods sharing a network namespace)");
    assert_eq!(negotiate_version(1, 5).unwrap(), 5, "a version-5 sender is still served");
    assert!(matches!(negotiate_version(8, 9), Err(ProtocolError::NoCommonVersion { .. })));
}

#[test]
fn keepalives_are_skipped_by_every_reader() {
    let mut w = FrameWriter::new(Vec::new());
    w.write_frame(MessageKind::Keepalive, b"").unwrap();
    w.write_frame(MessageKind::Keepalive, b"").unwrap();
    w.write_frame(MessageKind::Commit, b"").unwrap();
    let bytes = w.get_ref().clone();
    let mut r = FrameReader::new(&bytes[..]);
    assert_eq!(r.read_frame().unwrap().kind, MessageKind::Commit);
    assert!(matches!(r.read_frame(), Err(ProtocolError::Closed)));
}

#[test]
fn total_size_limit_is_enforced_before_decompressing() {
    let mut w = FrameWriter::new(Vec::new());
    let mut c = Compressor::new(CompressionMode::Always);
    for _ in 0..3 {
        c.write(&mut w, MessageKind::RootfsData, &vec![0u8; 1 << 20]).unwrap();
    }
    let bytes = w.get_ref().clone();
    assert!(bytes.len() < 64 * 1024, "three compressed MiB are small on the wire");
    let mut r = FrameReader::new(&bytes[..]).with_limit((2 << 20) + 10);
    r.read_frame().unwrap();
    r.read_frame().unwrap();
    match r.read_frame() {
        Err(ProtocolError::StreamTooLarge { limit }) => assert_eq!(limit, (2 << 20) + 10),
        other => panic!("expected StreamTooLarge, got {other:?}"),
    }
}
