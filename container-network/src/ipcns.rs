//! The IPC namespace a receiver makes for a pod whose containers share
//! one (as a Kubernetes pod's do): a new namespace bind-mounted on a file
//! named after the pod's leader, which every member's restore joins (runc
//! hands a namespace path of the configuration to CRIU as `join_ns`, and
//! CRIU restores the dumped IPC settings into it). The file is needed for
//! the restores only; the receiver removes it after the pod's last
//! session (the restored tasks keep the namespace).
//!
//! Its System V objects come with the members' dumps, each of which holds
//! a copy of them: the first member restored makes them, the others find
//! them there (CRIU patch 0006), so the receiver restores such a pod's
//! members one at a time.

use std::path::{Path, PathBuf};

use crate::NetworkError;

/// Where the receiver keeps the IPC namespaces it made for pods.
pub const IPC_NAMESPACE_DIR: &str = "/run/ctmigrate/ipcns";

/// The file of pod leader `id`'s IPC namespace.
pub fn ipc_namespace_path(id: &str) -> PathBuf {
    Path::new(IPC_NAMESPACE_DIR).join(id)
}

/// Makes a new IPC namespace on [`ipc_namespace_path`]`(id)` (fails if it
/// exists), by a thread of its own that then ends.
pub fn create_ipc_namespace(id: &str) -> Result<PathBuf, NetworkError> {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return Err(NetworkError::Invalid(format!("`{id}` is not a valid IPC namespace name")));
    }
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |context: String| move |source: std::io::Error| NetworkError::Io { context, source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(IPC_NAMESPACE_DIR).map_err(io(format!("creating {IPC_NAMESPACE_DIR}")))?;
    let path = ipc_namespace_path(id);
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o000).open(&path).map_err(io(format!("creating {}", path.display())))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<(), NetworkError> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)
            .map_err(|e| NetworkError::Io { context: "making an IPC namespace".into(), source: e.into() })?;
        nix::mount::mount(Some("/proc/thread-self/ns/ipc"), &target, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| NetworkError::Io { context: format!("bind-mounting a new IPC namespace on {}", target.display()), source: e.into() })
    })
    .join()
    .unwrap_or_else(|_| Err(NetworkError::Invalid("the thread making an IPC namespace panicked".into())));
    match made {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = remove_ipc_namespace(id);
            Err(e)
        }
    }
}

/// Removes what [`create_ipc_namespace`] made for `id` (nothing there is
/// fine). The namespace itself goes with its last process.
pub fn remove_ipc_namespace(id: &str) -> Result<(), NetworkError> {
    let path = ipc_namespace_path(id);
    if !path.exists() {
        return Ok(());
    }
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(|source| NetworkError::Io { context: format!("removing IPC namespace {}", path.display()), source })
}
