//! What the destination side does to its host, behind one small trait:
//! the container's network built (interfaces down) before the source
//! freezes, runc's restore (CRIU leaving every task stopped), the check
//! that they are, letting the copy run after the Commit, and removing a
//! copy that must not run. [`RealDestinationHost`] acts through runc; the sequence
//! tests (`destination/tests.rs`) drive a receiver's session through a
//! recording fake, with no root, CRIU or runc.

use std::path::Path;

use container_network::nudge::TcpConnection;
use container_network::{DestinationNetwork, NetworkRecord};
use container_runtime::Runc;

use crate::journal::DestinationPlan;
use crate::MigrationError;

/// One restore: the container's id, its bundle (whose CRIU configuration
/// holds the fence), the images, CRIU's work directory.
pub(crate) struct RestoreRequest<'r> {
    pub dest_id: &'r str,
    pub bundle: &'r Path,
    pub images: &'r Path,
    pub work: &'r Path,
    pub tcp_established: bool,
    /// Post-copy: memory comes through the lazy-pages daemon.
    pub lazy_pages: bool,
}

pub(crate) trait DestinationHost: Send + Sync {
    /// Whether the runtime already has a container `dest_id`.
    fn exists(&self, dest_id: &str) -> Result<bool, MigrationError>;
    /// Builds `record` for container `dest_id`: its namespace, interfaces
    /// with their host ends on `bridge`, down until [`Self::run`].
    fn build_network(&self, record: &NetworkRecord, dest_id: &str, bridge: Option<&str>) -> Result<(), MigrationError>;
    /// Removes what [`Self::build_network`] made.
    fn remove_network(&self, record: &NetworkRecord, dest_id: &str);
    /// Makes the IPC namespace of the pod led by `leader`, which every
    /// member's restore joins.
    fn make_pod_ipc_namespace(&self, leader: &str) -> Result<(), MigrationError>;
    /// Removes what [`Self::make_pod_ipc_namespace`] made.
    fn remove_pod_ipc_namespace(&self, leader: &str);
    /// Restores, calling `started` with runc's pid once it runs.
    fn restore(&self, request: &RestoreRequest<'_>, started: &mut dyn FnMut(u32)) -> Result<(), MigrationError>;
    /// The restored container's init pid, and how many tasks it has, each
    /// checked to be stopped: none may run before the Commit.
    fn check_stopped(&self, dest_id: &str) -> Result<(i32, usize), MigrationError>;
    /// After the Commit: the network up and the tasks let run.
    fn run(&self, plan: &DestinationPlan, dest_id: &str) -> Result<(), MigrationError>;
    /// Makes the peers of `connections` (read from the images) retransmit
    /// now, from inside the network namespace at `netns`; how many were
    /// nudged.
    fn nudge(&self, netns: &Path, connections: &[TcpConnection]) -> Result<usize, MigrationError>;
    /// Removes a restored copy that must not run, or what a restore
    /// stopped midway left (killed, deleted, its state, mounts and cgroups
    /// gone).
    fn remove(&self, dest_id: &str, bundle: &Path);
}

/// The machine itself, through runc.
pub(crate) struct RealDestinationHost {
    pub runc: Runc,
}

impl DestinationHost for RealDestinationHost {
    fn exists(&self, dest_id: &str) -> Result<bool, MigrationError> {
        Ok(self.runc.exists(dest_id)?)
    }

    fn build_network(&self, record: &NetworkRecord, dest_id: &str, bridge: Option<&str>) -> Result<(), MigrationError> {
        DestinationNetwork::build(record, dest_id, bridge).map(drop).map_err(|e| MigrationError::Other(e.to_string()))
    }

    fn remove_network(&self, record: &NetworkRecord, dest_id: &str) {
        DestinationNetwork::existing(record, dest_id).remove();
    }

    fn make_pod_ipc_namespace(&self, leader: &str) -> Result<(), MigrationError> {
        container_network::ipcns::create_ipc_namespace(leader).map(drop).map_err(|e| MigrationError::Other(e.to_string()))
    }

    fn remove_pod_ipc_namespace(&self, leader: &str) {
        let _ = container_network::ipcns::remove_ipc_namespace(leader);
    }

    fn restore(&self, r: &RestoreRequest<'_>, started: &mut dyn FnMut(u32)) -> Result<(), MigrationError> {
        self.runc.restore(r.dest_id, r.bundle, r.images, r.work, container_runtime::runc::RestoreFlags { tcp_established: r.tcp_established, lazy_pages: r.lazy_pages }, started).map_err(Into::into)
    }

    fn check_stopped(&self, dest_id: &str) -> Result<(i32, usize), MigrationError> {
        let pid = self
            .runc
            .live_init_pid(dest_id)
            .map_err(|e| MigrationError::Remote(format!("the restored container is not running: {e}")))?;
        let tasks = crate::settle::check_stopped(&self.runc, dest_id).map_err(|e| MigrationError::Remote(e.to_string()))?;
        Ok((pid, tasks))
    }

    fn run(&self, plan: &DestinationPlan, dest_id: &str) -> Result<(), MigrationError> {
        crate::settle::run_destination(plan, dest_id)
    }

    fn nudge(&self, netns: &Path, connections: &[TcpConnection]) -> Result<usize, MigrationError> {
        container_network::nudge::nudge(netns, connections).map_err(|e| MigrationError::Other(e.to_string()))
    }

    fn remove(&self, dest_id: &str, bundle: &Path) {
        crate::settle::remove_restored(&self.runc, dest_id, bundle);
    }
}
