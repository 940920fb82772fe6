//! The ctmigrate migration stream.
//!
//! Every message travels in a [`Frame`]: a fixed 24-byte header (magic,
//! frame-format version, message kind, flags, lengths, CRC-32C) followed by
//! a payload that may be zstd-compressed. Control messages carry JSON
//! payloads ([`messages`]); bulk data (rootfs entries, CRIU images) is
//! binary. docs/protocol.md describes the format and the message sequence.
//!
//! This crate depends on none of the runtime, network or CRIU crates (so
//! that it and the fuzz targets build anywhere): what a [`Manifest`]
//! carries of them has wire types of its own here ([`NetworkWire`],
//! [`InterfaceWire`], [`RouteWire`], [`EmptyTmpfsWire`]), converted at the
//! edges by `From` impls in the crates that own the domain types
//! (container-network's `NetworkRecord`, container-runtime's
//! `EmptyTmpfs`), which also validate what a receiver converted.

pub mod compress;
pub mod crc;
pub mod frame;
pub mod messages;
pub mod rootfs;
pub mod state;
pub mod transfer;

pub use compress::{CompressionMode, Compressor};
pub use frame::{Frame, FrameReader, FrameWriter, MessageKind, FRAME_HEADER_LEN, MAX_PAYLOAD};
pub use messages::*;
pub use rootfs::{RootfsEnd, RootfsPhase};
pub use state::{PeerDecision, SourceFate, SourceMachine, SourceState, DestinationMachine, DestinationState};

/// Protocol versions this build speaks; the handshake picks the highest
/// version both peers share.
///
/// Version 3 replaced the rootfs tar stream with entry records and the
/// tree digest ([`rootfs`]). Version 4 fences the commit: the destination
/// restores with its tasks stopped, runs them only after Commit, and
/// answers queries about a migration's outcome ([`state`]). Older peers
/// are refused at the handshake: they would run the copy before Commit.
pub const PROTOCOL_VERSION_MIN: u32 = 4;
pub const PROTOCOL_VERSION_MAX: u32 = 7;
/// The first version with post-copy (RunOnLease and the lazy-pages relay).
pub const PROTOCOL_VERSION_POSTCOPY: u32 = 5;
/// The first version with pods (the Manifest's `pod`: containers sharing a
/// network namespace, committed or rolled back as one).
pub const PROTOCOL_VERSION_PODS: u32 = 6;
/// The first version with pods sharing an IPC namespace (the pod's
/// `shares_ipc` and `shares_network`).
pub const PROTOCOL_VERSION_IPC_PODS: u32 = 7;

/// Errors reading or writing the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("stream truncated: {0}")]
    Truncated(&'static str),
    #[error("not a ctmigrate stream (bad magic {0:#010x}): is the peer a ctmigrate receiver?")]
    BadMagic(u32),
    #[error("frame format version {got} is not supported (this build reads version {supported}): upgrade ctmigrate on both hosts")]
    UnsupportedFrameVersion { got: u16, supported: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("unknown frame flags {0:#x}")]
    UnknownFlags(u32),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("the stream exceeds the receiver's limit of {limit} bytes (--max-bytes)")]
    StreamTooLarge { limit: u64 },
    #[error("checksum mismatch in a {kind:?} frame (expected {expected:#010x}, computed {actual:#010x}): data was corrupted in transit")]
    ChecksumMismatch {
        kind: MessageKind,
        expected: u32,
        actual: u32,
    },
    #[error("cannot decompress a {kind:?} frame: {reason}")]
    Decompress { kind: MessageKind, reason: String },
    #[error("decompressed size {actual} of a {kind:?} frame differs from its header's {expected}")]
    SizeMismatch {
        kind: MessageKind,
        expected: u32,
        actual: usize,
    },
    #[error("malformed {kind:?} message: {reason}")]
    Malformed { kind: MessageKind, reason: String },
    #[error("expected a {expected} message, got {got:?}")]
    UnexpectedMessage {
        expected: &'static str,
        got: MessageKind,
    },
    #[error("no common protocol version: this build speaks {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}; upgrade the older side")]
    NoCommonVersion {
        ours_min: u32,
        ours_max: u32,
        theirs_min: u32,
        theirs_max: u32,
    },
}

/// Picks the protocol version for a peer offering `theirs_min..=theirs_max`.
pub fn negotiate_version(theirs_min: u32, theirs_max: u32) -> Result<u32, ProtocolError> {
    let hi = theirs_max.min(PROTOCOL_VERSION_MAX);
    let lo = theirs_min.max(PROTOCOL_VERSION_MIN);
    if lo > hi {
        return Err(ProtocolError::NoCommonVersion {
            ours_min: PROTOCOL_VERSION_MIN,
            ours_max: PROTOCOL_VERSION_MAX,
            theirs_min,
            theirs_max,
        });
    }
    Ok(hi)
}
