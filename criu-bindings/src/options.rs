//! Typed dump and restore options, turned into CRIU's `criu_opts`.

use std::path::PathBuf;

use crate::rpc::{CgroupRoot, CriuPageServerInfo, CriuCgMode, CriuNetworkLockMethod, CriuOpts, ExtMountMap, InheritFd};

/// A mount CRIU must treat as external: `key` names it in the images (the
/// mount point inside the container), `val` is what it maps to (at dump the
/// same key, at restore the host path to bind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalMount {
    pub key: String,
    pub val: String,
}

/// Options for a dump or pre-dump.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub images_dir: PathBuf,
    /// Where CRIU writes its log; the images directory if unset.
    pub work_dir: Option<PathBuf>,
    pub log_file: String,
    pub pid: i32,
    /// The container's root filesystem as seen from the host.
    pub root: Option<PathBuf>,
    pub pre_dump: bool,
    /// Images of the previous round, relative to `images_dir`.
    pub parent_images: Option<String>,
    pub track_mem: bool,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub ext_unix_sk: bool,
    pub manage_cgroups: bool,
    /// Freezer cgroup (v1 freezer directory, or v2 cgroup directory) CRIU
    /// uses to stop the tasks instead of ptrace.
    pub freeze_cgroup: Option<PathBuf>,
    /// `--external` entries, e.g. `net[4026532]:extRootNetNS`.
    pub external: Vec<String>,
    pub ext_mounts: Vec<ExternalMount>,
    pub network_lock: Option<NetworkLock>,
    pub display_stats: bool,
    /// CRIU's descriptor of a connected stream socket to send the pages to
    /// with the page-server protocol instead of writing page images (see
    /// [`crate::page_server`]; `criu swrk` only).
    pub page_server_fd: Option<i32>,
    /// Post-copy: anonymous private memory is not dumped but served, on
    /// request, over `page_server_fd` until the lazy-pages daemon closes
    /// (needs the project's CRIU patches 0002 and 0003).
    pub lazy_pages: bool,
}

/// How CRIU blocks the container's network while it is dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    Iptables,
    Nftables,
    Skip,
}

impl NetworkLock {
    fn to_rpc(self) -> CriuNetworkLockMethod {
        match self {
            NetworkLock::Iptables => CriuNetworkLockMethod::Iptables,
            NetworkLock::Nftables => CriuNetworkLockMethod::Nftables,
            NetworkLock::Skip => CriuNetworkLockMethod::Skip,
        }
    }
}

impl DumpOptions {
    pub(crate) fn to_rpc(&self, work_dir_fd: Option<i32>) -> CriuOpts {
        let mut o = base_opts(&self.images_dir, work_dir_fd, &self.log_file);
        o.pid = Some(self.pid);
        o.root = self.root.as_ref().map(|p| p.display().to_string());
        o.leave_running = Some(self.leave_running);
        o.tcp_established = Some(self.tcp_established);
        o.file_locks = Some(self.file_locks);
        o.ext_unix_sk = Some(self.ext_unix_sk);
        o.orphan_pts_master = Some(true);
        o.notify_scripts = Some(true);
        if self.manage_cgroups {
            o.manage_cgroups = Some(true);
            o.manage_cgroups_mode = Some(CriuCgMode::Soft as i32);
        }
        o.freeze_cgroup = self.freeze_cgroup.as_ref().map(|p| p.display().to_string());
        o.external = self.external.clone();
        o.ext_mnt = self.ext_mounts.iter().map(ext_mount).collect();
        o.track_mem = Some(self.track_mem || self.pre_dump || self.parent_images.is_some());
        o.parent_img = self.parent_images.clone();
        o.network_lock = self.network_lock.map(|m| m.to_rpc() as i32);
        o.display_stats = Some(self.display_stats);
        o.ps = self.page_server_fd.map(|fd| CriuPageServerInfo { fd: Some(fd), ..Default::default() });
        if self.lazy_pages {
            o.lazy_pages = Some(true);
        }
        o
    }
}

/// Options for a restore done through CRIU directly (ctmigrate restores
/// containers through the runtime; this serves tools and tests).
#[derive(Debug, Default)]
pub struct RestoreOptions {
    pub images_dir: PathBuf,
    pub work_dir: Option<PathBuf>,
    pub log_file: String,
    pub root: Option<PathBuf>,
    pub tcp_established: bool,
    pub rst_sibling: bool,
    pub manage_cgroups: bool,
    pub cgroup_roots: Vec<(Option<String>, String)>,
    pub ext_mounts: Vec<ExternalMount>,
    /// `(key, descriptor number in CRIU)` pairs; start the session with the
    /// descriptors at those numbers.
    pub inherit_fds: Vec<(String, i32)>,
    pub external: Vec<String>,
}

impl RestoreOptions {
    pub(crate) fn to_rpc(&self, work_dir_fd: Option<i32>) -> CriuOpts {
        let mut o = base_opts(&self.images_dir, work_dir_fd, &self.log_file);
        o.root = self.root.as_ref().map(|p| p.display().to_string());
        o.tcp_established = Some(self.tcp_established);
        o.rst_sibling = Some(self.rst_sibling);
        o.orphan_pts_master = Some(true);
        o.notify_scripts = Some(true);
        o.evasive_devices = Some(true);
        if self.manage_cgroups {
            o.manage_cgroups = Some(true);
            o.manage_cgroups_mode = Some(CriuCgMode::Soft as i32);
        }
        o.cg_root = self
            .cgroup_roots
            .iter()
            .map(|(ctrl, path)| CgroupRoot {
                ctrl: ctrl.clone(),
                path: path.clone(),
            })
            .collect();
        o.ext_mnt = self.ext_mounts.iter().map(ext_mount).collect();
        o.inherit_fd = self
            .inherit_fds
            .iter()
            .map(|(key, fd)| InheritFd {
                key: key.clone(),
                fd: *fd,
            })
            .collect();
        o.external = self.external.clone();
        o
    }
}

fn base_opts(images_dir: &std::path::Path, work_dir_fd: Option<i32>, log_file: &str) -> CriuOpts {
    CriuOpts {
        // -1 makes CRIU use the `images_dir` path instead of a descriptor.
        images_dir_fd: -1,
        images_dir: Some(images_dir.display().to_string()),
        work_dir_fd,
        log_level: Some(4),
        log_file: Some(if log_file.is_empty() { "criu.log".into() } else { log_file.into() }),
        ..Default::default()
    }
}

fn ext_mount(m: &ExternalMount) -> ExtMountMap {
    ExtMountMap {
        key: m.key.clone(),
        val: m.val.clone(),
    }
}
