//! How CRIU must dump a runc container so that `runc restore` accepts the
//! images: the same root, external mounts, external namespaces and
//! `descriptors.json` that runc itself would use for `runc checkpoint`.

use std::path::{Path, PathBuf};

use criu_bindings::ExternalMount;

use crate::{Freezer, RuncInternalState, RuntimeError};

/// Everything container-specific in a dump request.
#[derive(Debug, Clone)]
pub struct DumpPlan {
    pub pid: i32,
    pub root: PathBuf,
    pub ext_mounts: Vec<ExternalMount>,
    /// `--external` namespace entries such as `net[4026532]:extRootNetNS`.
    pub external_namespaces: Vec<String>,
    pub freezer: Freezer,
    /// Content of `descriptors.json` (the container's stdio as runc saw it),
    /// which `runc restore` reads from the images directory.
    pub descriptors_json: Vec<u8>,
    /// Whether the container has a network namespace path in its config.
    pub netns_path: Option<PathBuf>,
    /// tmpfs mounts empty at preflight, which the destination may mount
    /// anew (each checked again once frozen).
    pub empty_tmpfs: Vec<crate::EmptyTmpfs>,
}

impl DumpPlan {
    pub fn for_container(state: &RuncInternalState) -> Result<Self, RuntimeError> {
        let pid = state.init_process_pid;
        let cfg = &state.config;
        let mut ext = Vec::new();
        let has_cgroupns = cfg.namespaces.iter().any(|n| n.kind == "NEWCGROUP");
        let unified = crate::cgroup_version() == crate::cgroup::CgroupVersion::V2;
        let mut push = |dest: &str, val: &str| {
            let m = ExternalMount { key: dest.to_string(), val: val.to_string() };
            if !ext.contains(&m) {
                ext.push(m);
            }
        };
        for m in &cfg.mounts {
            match m.device.as_str() {
                "bind" => push(&m.destination, &m.destination),
                // On v1 without a cgroup namespace, runc bind-mounts each
                // controller's hierarchy below this destination: those are
                // the external mounts, found in the container's mount table.
                "cgroup" if !unified && !has_cgroupns => {
                    for mp in cgroup_mounts_below(pid, &m.destination)? {
                        push(&mp, &mp);
                    }
                }
                _ => {}
            }
        }
        for p in cfg.mask_paths.iter().flatten() {
            // Masked files are /dev/null bind mounts; masked directories are
            // read-only tmpfs, made anew on the destination when empty
            // (`empty_tmpfs`), else dumped by CRIU.
            let inside = Path::new("/proc").join(pid.to_string()).join("root").join(p.trim_start_matches('/'));
            if inside.is_file() || inside.metadata().map(|m| !m.is_dir()).unwrap_or(false) {
                push(p, "/dev/null");
            }
        }
        for d in cfg.devices.iter().flatten() {
            push(&d.path, &d.path);
        }

        let mut external_namespaces = Vec::new();
        let mut netns_path = None;
        for ns in &cfg.namespaces {
            if ns.path.is_empty() {
                continue;
            }
            let (name, key) = match ns.kind.as_str() {
                "NEWNET" => ("net", "extRootNetNS"),
                "NEWPID" => ("pid", "extRootPidNS"),
                _ => continue,
            };
            if ns.kind == "NEWNET" {
                netns_path = Some(PathBuf::from(&ns.path));
            }
            let ino = std::fs::metadata(&ns.path)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(crate::io_err(&ns.path))?;
            external_namespaces.push(format!("{name}[{ino}]:{key}"));
        }

        // Without a mount namespace of its own the table would be the host's.
        let empty_tmpfs = if cfg.namespaces.iter().any(|n| n.kind == "NEWNS") { crate::tmpfs::empty_tmpfs_mounts(pid) } else { Vec::new() };
        let descriptors_json = serde_json::to_vec(&state.external_descriptors)
            .map_err(|e| RuntimeError::Config(e.to_string()))?;
        Ok(Self {
            pid,
            root: cfg.rootfs.clone(),
            ext_mounts: ext,
            external_namespaces,
            freezer: Freezer::for_container(state)?,
            descriptors_json,
            netns_path,
            empty_tmpfs,
        })
    }
}

/// Mount points of type cgroup at or below `dest` in the mount namespace of
/// `pid`, as seen inside the container.
fn cgroup_mounts_below(pid: i32, dest: &str) -> Result<Vec<String>, RuntimeError> {
    let mounts = crate::procinfo::mountinfo(pid).map_err(crate::io_err(format!("/proc/{pid}/mountinfo")))?;
    let dest = Path::new(dest);
    Ok(mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(crate::procinfo::mount_point)
        .filter(|mp| mp == dest || crate::procinfo::lies_below(mp, dest))
        .map(|mp| mp.to_string_lossy().into_owned())
        .collect())
}
