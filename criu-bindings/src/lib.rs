//! A CRIU RPC client.
//!
//! CRIU's service mode (`criu swrk <fd>`) takes protobuf requests over a
//! `SOCK_SEQPACKET` socket, one message per packet. During a request CRIU may
//! send NOTIFY messages (for example `post-dump`, `setup-namespaces`), each of
//! which must be answered before it goes on; [`CriuSession::request`] hands
//! those to a caller-supplied closure, which may carry state.
//!
//! The message types in [`rpc`] are generated at build time from the
//! `rpc.proto` of the installed CRIU (see `build.rs`).

pub mod lazy;
mod options;
pub mod page_server;
pub mod pagemap;
mod session;
mod sys;

pub use options::{DumpOptions, ExternalMount, NetworkLock, RestoreOptions};
pub use sys::page_server_socketpair;
pub use session::{default_binary, feature_check, version, CriuSession, Notification, NotifyAction};

/// Messages generated from CRIU's `rpc.proto`.
pub mod rpc {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

use std::path::PathBuf;

/// Everything that can go wrong talking to CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot start `{binary} swrk`: {source} (is CRIU installed? run ./install.sh)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU RPC socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("CRIU RPC socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("CRIU closed its RPC socket before answering (it may have crashed; see its log)")]
    UnexpectedEof,
    #[error("cannot decode CRIU's answer: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("CRIU answered a {got:?} request while {expected:?} was pending")]
    UnexpectedResponse {
        expected: rpc::CriuReqType,
        got: rpc::CriuReqType,
    },
    #[error("CRIU {request:?} failed (errno {errno}){}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Failed {
        request: rpc::CriuReqType,
        errno: i32,
        message: Option<String>,
    },
    #[error("notification `{script}` handler refused to continue: {reason}")]
    NotifyRejected { script: String, reason: String },
    #[error("CRIU exited with {0}")]
    Exited(std::process::ExitStatus),
    #[error("CRIU (pid {pid}) died before answering (killed?){}", if helpers.is_empty() { String::new() } else { format!("; its helpers {helpers:?} that still held its socket were killed") })]
    Died { pid: u32, helpers: Vec<i32> },
}

/// CRIU's version as reported over RPC.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
}

impl CriuVersion {
    /// Encoded as CRIU and runc do: 40201 for 4.2.1.
    pub fn as_number(&self) -> u32 {
        self.major * 10_000 + self.minor * 100 + self.sublevel
    }
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// Features CRIU can be asked about with FEATURE_CHECK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuFeatures {
    /// Memory change tracking (soft-dirty), needed by pre-dump.
    pub mem_track: bool,
    /// Post-copy restore through userfaultfd.
    pub lazy_pages: bool,
    pub pidfd_store: bool,
}
