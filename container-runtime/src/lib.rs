//! The container side of a migration: finding a container through runc,
//! freezing its cgroup, working out how CRIU must dump it so that
//! `runc restore` can bring it back, and building the destination bundle.

pub mod bundle;
pub mod cgroup;
pub mod procinfo;
#[cfg(feature = "criu")]
pub mod dump_plan;
pub mod runc;
pub mod tmpfs;

pub use bundle::{validate_container_id, BundlePolicy};
pub use oci_spec::runtime::Spec;
pub use cgroup::{cgroup_version, Freezer, FreezerState};
#[cfg(feature = "criu")]
pub use dump_plan::DumpPlan;
pub use runc::{ContainerStatus, Runc, RuncInternalState, RuncState};
pub use tmpfs::EmptyTmpfs;

use std::path::PathBuf;

/// Errors from the runtime, cgroups and bundles.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container `{id}` not found in runtime root {root}: check the id with `runc --root {root} list`, or pass --runtime-root")]
    NotFound { id: String, root: PathBuf },
    #[error("container `{id}` is {status}, not running: only running containers can be migrated")]
    NotRunning { id: String, status: String },
    #[error("cannot run `{binary}`: {source} (is runc installed? run ./install.sh)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`runc {action}` failed: {message}")]
    Command { action: String, message: String },
    #[error("cannot read runc's state for `{id}` at {path}: {reason}")]
    State {
        id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("freezing {path} did not complete within {waited_ms} ms (a task may be stuck in the kernel); the cgroup was thawed again")]
    FreezeTimeout { path: PathBuf, waited_ms: u64 },
    #[error("invalid container id `{id}`: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("OCI config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.into();
    move |source| RuntimeError::Io { path, source }
}
