//! Migration errors and what they mean for the source container.

use container_runtime::RuntimeError;
use criu_bindings::CriuError;
use migration_protocol::ProtocolError;

/// What happened to the source container when a migration failed. Each maps
/// to one documented exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Refused before anything was touched (bad input, preflight, the
    /// destination refused the manifest). Exit 3.
    NothingTouched,
    /// Failed after the source was frozen; it was thawed and runs. Exit 4.
    SourceResumed,
    /// The source could not be resumed. Exit 5: needs an operator now.
    SourceNotResumed,
    /// In doubt: the Commit went out and the destination did not say what
    /// it did in time. The source stays frozen (never running while the
    /// destination might); `ctmigrate resolve` settles it. Exit 6.
    Uncertain,
}

impl From<migration_protocol::SourceFate> for Outcome {
    fn from(fate: migration_protocol::SourceFate) -> Self {
        use migration_protocol::SourceFate::*;
        match fate {
            // Not a failure; never turned into one.
            Migrated | Untouched => Outcome::NothingTouched,
            Resumed => Outcome::SourceResumed,
            NotResumed => Outcome::SourceNotResumed,
            InDoubt => Outcome::Uncertain,
        }
    }
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::NothingTouched => 3,
            Outcome::SourceResumed => 4,
            Outcome::SourceNotResumed => 5,
            Outcome::Uncertain => 6,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("migration stream: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("cannot reach the destination {addr}: {reason}; check that `ctmigrate receive` listens there and the address is routable")]
    Unreachable { addr: String, reason: String },
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the destination failed: {0}")]
    Remote(String),
    #[error("the sender aborted: {0}")]
    Aborted(String),
    #[error("{0}")]
    Preflight(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The destination's rootfs is not the source's: refused before restore.
    #[error("{0}")]
    RootfsMismatch(String),
    /// What the sender sent breaks the protocol's rules for its place in
    /// the stream (a round out of order, an image not listed, a checksum
    /// that differs, a path outside the rootfs): the peer hears
    /// `bad-stream`.
    #[error("{0}")]
    BadStream(String),
    #[error("injected failure at `{0}`")]
    Injected(String),
    #[error("{0}")]
    Other(String),
}

impl MigrationError {
    /// The code the receiver sends its peer in an Error message for this
    /// failure (docs/protocol.md, message 13).
    pub fn peer_code(&self) -> migration_protocol::ErrorCode {
        use migration_protocol::ErrorCode;
        match self {
            MigrationError::Protocol(ProtocolError::NoCommonVersion { .. }) => ErrorCode::IncompatibleVersion,
            MigrationError::Refused(_) => ErrorCode::Refused,
            MigrationError::Protocol(_) | MigrationError::RootfsMismatch(_) | MigrationError::BadStream(_) => ErrorCode::BadStream,
            MigrationError::Remote(_) => ErrorCode::RestoreFailed,
            _ => ErrorCode::Internal,
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
        let context = context.into();
        move |source| MigrationError::Io { context, source }
    }
}

/// A failed migration: the error, and what became of the source.
#[derive(Debug)]
pub struct Failure {
    pub error: MigrationError,
    pub outcome: Outcome,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}
