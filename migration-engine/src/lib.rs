//! Live migration of runc containers: the sender ([`send`]), the receiver
//! ([`receive`]) and the preflight check ([`check`]). The one-machine
//! validation and the tests' two hosts live in the `migration-testbed`
//! crate.
//!
//! The command-line binary is a thin layer over these functions; each
//! returns a typed error whose [`Outcome`] decides the exit code.

/// A named fault-injection point (see [`failpoints`]): fails, exits or
/// stalls as `CTMIGRATE_FAILPOINTS` says, in builds with the `failpoints`
/// feature; `Ok(())`, and nothing in the binary, in others.
macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        let hit = $crate::failpoints::hit($name);
        #[cfg(not(feature = "failpoints"))]
        let hit: Result<(), $crate::MigrationError> = Ok(());
        hit
    }};
}

/// Whether the failpoint `name` asks for corruption (`name=corrupt`); false
/// without the `failpoints` feature.
macro_rules! corrupt_at {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        let corrupt = $crate::failpoints::should_corrupt($name);
        #[cfg(not(feature = "failpoints"))]
        let corrupt = false;
        corrupt
    }};
}

pub mod audit;
pub mod check;
pub mod error;
pub mod evacuate;
pub mod events;
pub mod failpoints;
pub mod failure_logs;
pub mod guard;
pub mod images;
pub mod interrupt;
pub mod lease_guard;
pub mod metrics;
pub mod pods;
pub mod precopy;
pub mod priority;
pub mod destination;
pub mod rlimit_support;
pub mod rootfs;
pub mod scratch;
pub mod source;
pub mod settle;
pub mod journal;
pub mod resolve;
pub mod tls;
pub mod transport;

pub use error::{MigrationError, Outcome};
pub use events::{Event, Reporter};
pub use destination::{admission, listener, receive, receive_stdio, ReceiveOptions};
pub use source::{send, SendOptions, SendReport};

/// Default place for working files (image directories): a tmpfs on most
/// hosts, root-only.
pub const DEFAULT_WORK_ROOT: &str = "/run/ctmigrate";

/// This build's name and version, sent in the handshake.
pub fn software() -> String {
    format!("ctmigrate {}", env!("CARGO_PKG_VERSION"))
}

/// The CRIU binary: `$CTMIGRATE_CRIU`, else `criu` on PATH.
pub fn criu_binary() -> std::path::PathBuf {
    criu_bindings::default_binary()
}
