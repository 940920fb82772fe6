//! Acting on one host's copy of a container as its journal entry allows:
//! thaw or remove the source, let the destination's stopped copy run or
//! remove it. The sender and receiver call these as they go; the freeze
//! guard, a restarted receiver and `ctmigrate resolve` call them from a
//! journal entry alone, with no migration running.

use std::path::Path;
use std::time::{Duration, Instant};

use container_runtime::cgroup::CgroupVersion;
use container_runtime::{procinfo, Freezer, FreezerState, Runc};

use crate::journal::{DestinationPlan, SourcePlan};
use crate::MigrationError;

impl SourcePlan {
    pub fn runc(&self) -> Runc {
        Runc::new(&self.runc_binary, &self.runtime_root)
    }

    pub fn freezer(&self) -> Freezer {
        Freezer {
            path: self.freezer_path.clone(),
            version: if self.cgroup_version == 1 { CgroupVersion::V1 } else { CgroupVersion::V2 },
        }
    }

    fn netns(&self) -> Option<container_network::Netns> {
        self.netns.clone().map(container_network::Netns::Path)
    }
}

/// Thaws the source, gives it its network back, and checks that it runs.
pub fn thaw_source(plan: &SourcePlan, container: &str) -> Result<(), MigrationError> {
    let freezer = plan.freezer();
    freezer.thaw()?;
    if let Some(netns) = plan.netns() {
        if let Err(e) = container_network::lock::unlock(&netns) {
            return Err(MigrationError::Other(format!("cannot unlock the container's network {}: {e}", netns.path().display())));
        }
    }
    let state = plan.runc().state(container)?;
    if state.status != "running" {
        return Err(MigrationError::Other(format!("the source is {} after thawing", state.status)));
    }
    if freezer.state()? != FreezerState::Thawed {
        return Err(MigrationError::Other("the source's cgroup is still frozen".into()));
    }
    if !procinfo::exists(plan.init_pid) {
        return Err(MigrationError::Other("the source's init process is gone".into()));
    }
    Ok(())
}

/// Kills and deletes the (frozen) source once the destination runs it.
/// Returns what could not be done, as warnings: the migration itself is
/// decided.
pub fn remove_source(plan: &SourcePlan, container: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    let runc = plan.runc();
    // First the links (while the namespace can still be named), so the
    // source's bridge port goes now, not when the last orphaned socket of
    // the dead container gives up.
    if let (Some(netns), Some(record)) = (plan.netns(), plan.network.as_ref()) {
        if let Err(e) = container_network::destination::remove_interfaces(&netns, record) {
            warnings.push(format!("removing the source's interfaces failed: {e}"));
        }
    }
    // A frozen task acts on SIGKILL as soon as it is thawed, before it
    // returns to user space: it never runs again.
    let freezer = plan.freezer();
    if let Err(e) = runc.kill(container, "KILL") {
        // runc may have lost track of it; the cgroup has not.
        for pid in freezer.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        warnings.push(format!("`runc kill` of the source failed ({e}); its tasks were killed through the cgroup"));
    }
    if let Err(e) = freezer.thaw() {
        warnings.push(format!("thawing the killed source failed: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while procinfo::exists(plan.init_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Err(e) = runc.delete_force(container) {
        warnings.push(format!("`runc delete` of the source failed: {e}"));
    }
    if let Some(netns) = plan.netns().filter(|_| plan.remove_netns) {
        if let Err(e) = netns.remove() {
            warnings.push(format!("removing the source's network namespace {} failed: {e}", netns.path().display()));
        }
    }
    warnings
}

impl DestinationPlan {
    pub fn runc(&self) -> Runc {
        Runc::new(&self.runc_binary, &self.runtime_root)
    }
}

/// The tasks of restored container `id`, from its cgroup.
fn container_tasks(runc: &Runc, id: &str) -> Result<Vec<i32>, MigrationError> {
    let state = runc.internal_state(id)?;
    Ok(Freezer::for_container(&state)?.pids())
}

/// Whether task `pid` is stopped (state `T`).
fn is_stopped(pid: i32) -> bool {
    procinfo::stat(pid).is_some_and(|s| matches!(s.state(), Ok(procfs::process::ProcState::Stopped)))
}

/// Checks that every task of the restored container `id` is stopped, as
/// the restore was asked to leave them: a copy that runs before Commit
/// would break the fence.
pub fn check_stopped(runc: &Runc, id: &str) -> Result<usize, MigrationError> {
    let tasks = container_tasks(runc, id)?;
    if tasks.is_empty() {
        return Err(MigrationError::Other(format!("the restored container {id} has no tasks")));
    }
    // CRIU stops each task as it lets go of it; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let running: Vec<i32> = tasks.iter().copied().filter(|p| !is_stopped(*p)).collect();
        if running.is_empty() {
            return Ok(tasks.len());
        }
        if Instant::now() > deadline {
            return Err(MigrationError::Other(format!(
                "the restored container {id} has tasks that are not stopped ({running:?}): the restore did not leave them stopped"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lets the committed copy run: network up, then every task continued.
pub fn run_destination(plan: &DestinationPlan, id: &str) -> Result<(), MigrationError> {
    if let Some(record) = &plan.network {
        container_network::DestinationNetwork::existing(record, id)
            .activate()
            .map_err(|e| MigrationError::Other(format!("cannot bring up the restored container's network: {e}")))?;
    }
    for pid in container_tasks(&plan.runc(), id)? {
        // A task that exited meanwhile is no error.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT);
    }
    Ok(())
}

/// Processes whose command line names `bundle`: a `runc restore` that
/// outlived the receiver that started it.
fn processes_naming(bundle: &Path) -> Vec<i32> {
    let needle = bundle.as_os_str().as_encoded_bytes();
    procinfo::processes_with_argument(|arg| arg == needle)
}

/// Stops a restore of `bundle` still under way (its receiver died while
/// CRIU restored): a restore finishing after the copy was removed would
/// leave a container no journal answers for. Killing runc ends CRIU's
/// RPC session, and CRIU then kills what it had restored.
fn stop_restore_in_flight(bundle: &Path) {
    let pids = processes_naming(bundle);
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| procinfo::exists(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the cgroups the bundle's config names (`linux.cgroupsPath`) in
/// every hierarchy, deepest first: a restore stopped midway (its runc
/// killed) leaves them without a runc state that `runc delete` would
/// clean, and a cgroup left there refuses the next migration of that id.
/// Tasks still in them are killed first: a CRIU killed midway leaves the
/// tasks it was restoring, which nothing else would end.
pub(crate) fn remove_cgroups_of(bundle: &Path) {
    let Ok(config) = std::fs::read(bundle.join("config.json")) else { return };
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(&config) else { return };
    let Some(path) = config["linux"]["cgroupsPath"].as_str() else { return };
    let rel = Path::new(path.trim_start_matches('/'));
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return;
    }
    let mut roots = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let dirs: Vec<_> = roots.iter().map(|r| r.join(rel)).filter(|d| d.join("cgroup.procs").exists()).collect();
    for dir in &dirs {
        kill_tasks_below(dir);
    }
    // Killed tasks take a moment to leave their cgroup.
    let deadline = Instant::now() + Duration::from_secs(3);
    for dir in &dirs {
        while remove_cgroup_tree(dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGKILL to every task in cgroup `dir` and below; a frozen cgroup
/// (v1 freezer, v2 cgroup.freeze) is thawed so that they act on it.
fn kill_tasks_below(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten().filter(|e| e.file_type().is_dir()) {
        let procs = std::fs::read_to_string(entry.path().join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        for (control, thawed) in [("freezer.state", "THAWED"), ("cgroup.freeze", "0")] {
            let path = entry.path().join(control);
            if path.exists() {
                let _ = std::fs::write(&path, thawed);
            }
        }
    }
}

/// rmdir of a cgroup and the cgroups below it (a cgroup directory holds
/// only control files, which go with it).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Kills and deletes container `id` if runc knows it.
fn remove_container(runc: &Runc, id: &str) {
    if runc.exists(id).unwrap_or(false) {
        let _ = runc.kill(id, "KILL");
        let _ = runc.delete_force(id);
    }
}

/// Removes an uncommitted copy and everything staged for it.
pub fn remove_destination(plan: &DestinationPlan, id: &str) {
    remove_uncommitted(&plan.runc(), id, &plan.bundle);
    crate::scratch::remove_work_dir(&plan.work_dir);
}

/// Removes an uncommitted copy of container `id` staged in `bundle` whose
/// receiver is gone: a restore still under way, the copy or what a
/// stopped restore left, its network namespace, the bundle.
pub(crate) fn remove_uncommitted(runc: &Runc, id: &str, bundle: &Path) {
    stop_restore_in_flight(bundle);
    remove_restored(runc, id, bundle);
    // Whether or not the manifest had a network record: a namespace of
    // this name is the migration's either way.
    let _ = container_network::DestinationNetwork::remove_for(id);
    let _ = std::fs::remove_dir_all(bundle);
}

/// Removes a restored or half-restored container `id` of `bundle`: the
/// container if runc knows it; else what a runc restore stopped midway
/// leaves (its state directory, without a state file runc would know,
/// holding the bind mount of the rootfs it prepared for CRIU); mounts
/// below the bundle; its cgroups and any task left in them.
pub(crate) fn remove_restored(runc: &Runc, id: &str, bundle: &Path) {
    remove_container(runc, id);
    let state_dir = runc.root.join(id);
    if state_dir.is_dir() && !runc.exists(id).unwrap_or(true) {
        crate::scratch::unmount_below(&state_dir);
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    crate::scratch::unmount_below(bundle);
    remove_cgroups_of(bundle);
}
