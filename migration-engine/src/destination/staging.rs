//! Staging: what a migration being received holds on this host (bundle,
//! work directory, images tmpfs, reserves, network, cgroups), removed as a
//! whole unless committed; and the sweep of what dead receivers left.

use super::*;

/// The first hierarchy in which the cgroup `path` already exists.
pub(super) fn existing_cgroup(path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    roots.into_iter().map(|r| r.join(rel)).find(|p| p.join("cgroup.procs").exists() || p.join("tasks").exists())
}

/// What one incoming migration created; removed on drop unless committed.
pub(super) struct Staging {
    /// Removes a restored copy (see [`super::host`]).
    pub(super) host: Arc<dyn DestinationHost>,
    pub(super) dest_id: String,
    pub(super) bundle: PathBuf,
    /// `work_root/recv-<id>-<pid>`, holding images/ and CRIU's logs.
    pub(super) work_dir: PathBuf,
    pub(super) images: PathBuf,
    pub(super) work: PathBuf,
    pub(super) restore_attempted: bool,
    pub(super) committed: bool,
    /// The network built for the container (removed with the rest).
    pub(super) network: Option<NetworkRecord>,
    /// Staging memory set aside before the freeze (memory staging only).
    pub(super) reserve: Option<crate::scratch::Reserve>,
    /// Memory for the restore's first read block, set aside with `reserve`.
    pub(super) restore_block: Option<crate::scratch::Reserve>,
    /// The migration's admission (destination id, staging memory), given
    /// back when everything above is gone.
    pub(super) admission: Option<crate::admission::Ticket>,
}

impl Staging {
    pub(super) fn create(opts: &ReceiveOptions, host: Arc<dyn DestinationHost>, dest_id: &str) -> Result<Self, MigrationError> {
        let bundle = opts.bundle_root.join(dest_id);
        let work_dir = opts.work_root.join(format!("recv-{dest_id}-{}", std::process::id()));
        let st = Staging {
            host,
            dest_id: dest_id.to_string(),
            images: work_dir.join("images"),
            work: work_dir.join("work"),
            bundle: bundle.clone(),
            work_dir,
            restore_attempted: false,
            committed: false,
            reserve: None,
            restore_block: None,
            network: None,
            admission: None,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&opts.bundle_root)
            .map_err(MigrationError::io(format!("creating {}", opts.bundle_root.display())))?;
        // create (not create_all): an existing bundle is never reused.
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&bundle)
            .map_err(MigrationError::io(format!("creating {}", bundle.display())))?;
        std::fs::write(bundle.join(INCOMPLETE_MARKER), std::process::id().to_string())
            .map_err(MigrationError::io("writing the staging marker"))?;
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(bundle.join("rootfs"))
            .map_err(MigrationError::io("creating the rootfs directory"))?;
        for d in [&st.images, &st.work] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(MigrationError::io(format!("creating {}", d.display())))?;
        }
        Ok(st)
    }

    /// A new tmpfs like the container's empty one, for CRIU to bind-mount
    /// in its place (the images name it external). Under the work
    /// directory, so that removing that unmounts it.
    pub(super) fn mount_empty_tmpfs(&self, index: usize, tmpfs: &EmptyTmpfs) -> Result<PathBuf, MigrationError> {
        let dir = self.work_dir.join(crate::scratch::EMPTY_TMPFS_DIR).join(index.to_string());
        // CRIU's configuration file splits its lines at blanks.
        if dir.to_string_lossy().chars().any(char::is_whitespace) {
            return Err(MigrationError::Usage(format!("--work-dir {} holds a blank, which CRIU's configuration cannot name: choose another", dir.display())));
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(MigrationError::io(format!("creating {}", dir.display())))?;
        let what = format!("the container's {}", tmpfs.mountpoint);
        crate::scratch::mount_tmpfs_with(&dir, &tmpfs.options.join(","), tmpfs.read_only, &what)?;
        Ok(dir)
    }

    /// Removes the leave-stopped line from the bundle's CRIU
    /// configuration once the restore is done.
    pub(super) fn drop_leave_stopped(&self) -> Result<(), MigrationError> {
        let path = self.bundle.join(container_runtime::bundle::CRIU_RESTORE_CONFIG);
        let config = std::fs::read_to_string(&path).map_err(MigrationError::io(format!("reading {}", path.display())))?;
        std::fs::write(&path, config.replace(LEAVE_STOPPED, "")).map_err(MigrationError::io(format!("writing {}", path.display())))
    }

    pub(super) fn commit(mut self) {
        self.committed = true;
        let _ = std::fs::remove_file(self.bundle.join(INCOMPLETE_MARKER));
        crate::scratch::remove_work_dir(&self.work_dir);
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if self.restore_attempted {
                self.host.remove(&self.dest_id, &self.bundle);
            }
            if let Some(record) = &self.network {
                self.host.remove_network(record, &self.dest_id);
            }
            let _ = std::fs::remove_dir_all(&self.bundle);
            crate::scratch::remove_work_dir(&self.work_dir);
        }
        // The reserves go before the admission that counted them.
        drop((self.reserve.take(), self.restore_block.take()));
        drop(self.admission.take());
    }
}


/// Removes what receivers that died mid-migration left: uncommitted
/// bundles (and any container restored from them, since its sender has
/// rolled back) and image directories.
pub fn sweep_stale(opts: &ReceiveOptions, runc: &Runc, rep: &Reporter) {
    // First what the journal says: a committed copy is finished and let
    // run, anything before that removed.
    let journal = Journal::new(&opts.journal_dir);
    for line in crate::resolve::recover_destinations(&journal) {
        rep.warn(line);
    }
    // Bundles a journal entry still answers for are not the marker's to remove.
    let claimed: std::collections::HashSet<PathBuf> = journal
        .list()
        .into_iter()
        .flatten()
        .filter_map(|e| match e.side {
            Side::Destination { state: DestinationState::Committed | DestinationState::Running, plan } => Some(plan.bundle),
            _ => None,
        })
        .collect();
    if let Ok(rd) = std::fs::read_dir(&opts.bundle_root) {
        for e in rd.flatten() {
            let marker = e.path().join(INCOMPLETE_MARKER);
            if claimed.contains(&e.path()) {
                continue;
            }
            let Ok(pid) = std::fs::read_to_string(&marker) else { continue };
            let pid: u32 = pid.trim().parse().unwrap_or(0);
            if pid == std::process::id() || crate::journal::is_ctmigrate_process(pid) {
                continue;
            }
            let id = e.file_name().to_string_lossy().into_owned();
            rep.warn(format!("removing {}, left uncommitted by a receiver that died", e.path().display()));
            crate::settle::remove_uncommitted(runc, &id, &e.path());
        }
    }
    if let Ok(rd) = std::fs::read_dir(&opts.work_root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("recv-") else { continue };
            let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !crate::journal::is_ctmigrate_process(pid) {
                crate::scratch::remove_work_dir(&e.path());
            }
        }
    }
}
