//! Driving the `runc` binary, and reading its on-disk state.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::{io_err, RuntimeError};

/// `runc` with a given state root (`--root`): one "host" of containers.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
}

/// How `runc restore` restores.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreFlags {
    /// Established TCP connections are in the images (CRIU's TCP repair).
    pub tcp_established: bool,
    /// Post-copy: anonymous memory comes later, through a lazy-pages
    /// daemon listening in the work directory.
    pub lazy_pages: bool,
}

/// What `runc state` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct RuncState {
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Running,
    Other,
}

impl RuncState {
    pub fn status(&self) -> ContainerStatus {
        if self.status == "running" {
            ContainerStatus::Running
        } else {
            ContainerStatus::Other
        }
    }
}

/// The parts of runc's private `state.json` a dump needs: the resolved
/// rootfs, mounts, masked paths, devices, namespaces, cgroup paths and the
/// container's standard descriptors. runc keeps this file at
/// `<root>/<id>/state.json`; its layout is runc's libcontainer state.
#[derive(Debug, Clone, Deserialize)]
pub struct RuncInternalState {
    pub id: String,
    pub init_process_pid: i32,
    /// Start time of the init process (clock ticks after boot, field 22 of
    /// /proc/PID/stat), which tells it from a later process of the same pid.
    #[serde(default)]
    pub init_process_start: u64,
    pub config: InternalConfig,
    #[serde(default)]
    pub cgroup_paths: std::collections::BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub external_descriptors: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InternalConfig {
    pub rootfs: PathBuf,
    #[serde(default)]
    pub mounts: Vec<InternalMount>,
    #[serde(default)]
    pub mask_paths: Option<Vec<String>>,
    #[serde(default)]
    pub devices: Option<Vec<InternalDevice>>,
    #[serde(default)]
    pub namespaces: Vec<InternalNamespace>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InternalMount {
    #[serde(default)]
    pub source: String,
    pub destination: String,
    #[serde(default)]
    pub device: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InternalDevice {
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InternalNamespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: String,
}

impl Runc {
    pub fn new(binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            root: root.into(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null());
        c
    }

    /// Runs runc, returning stdout; stderr becomes the error message.
    fn run(&self, action: &str, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, RuntimeError> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|source| RuntimeError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(RuntimeError::Command {
                action: action.to_string(),
                message: summarize_runc_stderr(&out.stderr),
            });
        }
        Ok(out.stdout)
    }

    /// `runc state ID`; a missing container is [`RuntimeError::NotFound`].
    pub fn state(&self, id: &str) -> Result<RuncState, RuntimeError> {
        match self.run("state", &["state".as_ref(), id.as_ref()]) {
            Ok(out) => serde_json::from_slice(&out).map_err(|e| RuntimeError::Command {
                action: "state".into(),
                message: format!("unreadable output: {e}"),
            }),
            Err(RuntimeError::Command { message, .. }) if message.contains("does not exist") => {
                Err(RuntimeError::NotFound {
                    id: id.to_string(),
                    root: self.root.clone(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether runc knows a container of this id (in any status).
    pub fn exists(&self, id: &str) -> Result<bool, RuntimeError> {
        match self.state(id) {
            Ok(_) => Ok(true),
            Err(RuntimeError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The running container, or a clear error if it is missing or stopped.
    pub fn running(&self, id: &str) -> Result<RuncState, RuntimeError> {
        let s = self.state(id)?;
        if s.status() != ContainerStatus::Running {
            return Err(RuntimeError::NotRunning {
                id: id.to_string(),
                status: s.status,
            });
        }
        Ok(s)
    }

    /// The pid of a container's init process if it is alive, read from
    /// runc's state file and /proc without running runc (which costs a
    /// program start inside the frozen window). `runc state` would also
    /// say "paused" for a frozen cgroup: callers that care check that.
    pub fn live_init_pid(&self, id: &str) -> Result<i32, RuntimeError> {
        let state = self.internal_state(id)?;
        let pid = state.init_process_pid;
        let alive_and_same = crate::procinfo::stat(pid)
            .is_some_and(|stat| !crate::procinfo::has_ended(&stat) && stat.starttime == state.init_process_start);
        if alive_and_same {
            Ok(pid)
        } else {
            Err(RuntimeError::NotRunning { id: id.to_string(), status: "stopped".into() })
        }
    }

    pub fn internal_state(&self, id: &str) -> Result<RuncInternalState, RuntimeError> {
        let path = self.root.join(id).join("state.json");
        let data = std::fs::read(&path).map_err(|e| RuntimeError::State {
            id: id.into(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_slice(&data).map_err(|e| RuntimeError::State {
            id: id.into(),
            path,
            reason: e.to_string(),
        })
    }

    /// `runc run -d`: starts a container with /dev/null as its stdio (the
    /// container inherits runc's; CRIU can dump /dev/null but not a file of
    /// ours). runc's own messages go to its `--log` file.
    pub fn run_detached(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        let log = std::env::temp_dir().join(format!("runc-run-{id}-{}.log", std::process::id()));
        let status = Command::new(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&log)
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| RuntimeError::Spawn { binary: self.binary.clone(), source });
        let messages = std::fs::read(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if !status?.success() {
            return Err(RuntimeError::Command { action: "run".into(), message: summarize_runc_stderr(&messages) });
        }
        Ok(())
    }

    /// `runc restore -d` from `images`, CRIU's log going to `work`;
    /// `started` gets runc's pid once it runs (CRIU and the restored tasks
    /// are its descendants until it returns).
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        images: &Path,
        work: &Path,
        flags: RestoreFlags,
        started: impl FnOnce(u32),
    ) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        // --auto-dedup: CRIU punches each page out of the images as it
        // restores it, so the restored process reuses the staging memory.
        // --file-locks: the dump carries fcntl, flock and OFD locks (the
        // sender asks CRIU for them); the restore must take them again.
        cmd.args(["restore", "-d", "--auto-dedup", "--file-locks"]);
        if flags.tcp_established {
            cmd.arg("--tcp-established");
        }
        // Post-copy: anonymous memory comes later, through the lazy-pages
        // daemon listening in the work directory.
        if flags.lazy_pages {
            cmd.arg("--lazy-pages");
        }
        cmd.arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg("--bundle")
            .arg(bundle)
            .arg(id);
        self.run_leaving_tasks("restore", cmd, work, Some(&work.join("restore.log")), started)
    }

    /// Runs a runc command that leaves container tasks behind. stdout is
    /// /dev/null and stderr a file: a pipe could be held open by the
    /// container and never reach end of file. (Restored tasks get their
    /// descriptors from the images, not from runc.)
    fn run_leaving_tasks(
        &self,
        action: &str,
        mut cmd: Command,
        err_dir: &Path,
        criu_log: Option<&Path>,
        started: impl FnOnce(u32),
    ) -> Result<(), RuntimeError> {
        let err_path = err_dir.join(format!("runc-{action}-{}.stderr", std::process::id()));
        let err_file = File::create(&err_path).map_err(io_err(&err_path))?;
        let status = cmd
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .and_then(|mut child| {
                started(child.id());
                wait_unless_criu_died(&mut child)
            })
            .map_err(|source| RuntimeError::Spawn { binary: self.binary.clone(), source });
        let stderr = std::fs::read(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&err_path);
        if !status?.success() {
            let mut message = summarize_runc_stderr(&stderr);
            if let Some(criu) = criu_log.and_then(criu_log_errors) {
                message.push_str("; CRIU: ");
                message.push_str(&criu);
            }
            return Err(RuntimeError::Command { action: action.into(), message });
        }
        Ok(())
    }

    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.run("kill", &["kill".as_ref(), id.as_ref(), signal.as_ref()]).map(|_| ())
    }

    pub fn delete_force(&self, id: &str) -> Result<(), RuntimeError> {
        self.run("delete", &["delete".as_ref(), "--force".as_ref(), id.as_ref()]).map(|_| ())
    }

    /// Ids of all containers under this root.
    pub fn list(&self) -> Result<Vec<String>, RuntimeError> {
        #[derive(Deserialize)]
        struct Item {
            id: String,
        }
        let out = self.run("list", &["list".as_ref(), "--format".as_ref(), "json".as_ref()])?;
        let items: Option<Vec<Item>> = serde_json::from_slice(&out).map_err(|e| RuntimeError::Command {
            action: "list".into(),
            message: e.to_string(),
        })?;
        Ok(items.unwrap_or_default().into_iter().map(|i| i.id).collect())
    }
}

/// runc logs JSON-ish lines (`time=... level=error msg="..."`); keep the
/// messages, one line.
fn summarize_runc_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let msgs: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.find("msg=") {
            Some(i) => l[i + 4..].trim_matches('"').replace("\\\"", "\""),
            None => l.trim().to_string(),
        })
        .collect();
    if msgs.is_empty() {
        "no error output".into()
    } else {
        msgs.join("; ")
    }
}

/// The last few `Error` messages of a CRIU log on one line, without
/// CRIU's timestamps and source positions, or None.
pub fn criu_log_errors(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut errs: Vec<&str> = Vec::new();
    for line in text.lines().filter(|l| l.contains("Error (")) {
        // "(00.068857) Error (criu/files-reg.c:1790): Can't lookup ..."
        let msg = line.split_once("): ").map(|(_, m)| m).unwrap_or(line).trim();
        if !msg.is_empty() && !errs.contains(&msg) {
            errs.push(msg);
        }
    }
    if errs.is_empty() {
        return None;
    }
    let start = errs.len().saturating_sub(3);
    Some(errs[start..].join("; "))
}

/// How long runc may wait on a CRIU that is gone before it is stopped.
const CRIU_GONE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for `runc`, unless the CRIU it started has died and runc goes on
/// waiting: what CRIU forked (its helpers, the tasks it was restoring,
/// which runc adopts as their subreaper) can outlive it holding the RPC
/// socket open, and runc then never sees the end of it (CRIU killed during
/// a restore). Those tasks are named `criu` too, so the one watched is
/// runc's `criu swrk` (the newest: runc's feature check runs one first):
/// once it has ended (a zombie runc does not reap, or gone) for
/// [`CRIU_GONE_GRACE`], runc is killed, so that the command fails
/// instead of hanging for ever. What CRIU left goes with the container's
/// cgroups (the caller's removal kills their tasks).
fn wait_unless_criu_died(runc: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    let pid = runc.id();
    let mut swrk: Option<u32> = None;
    let mut gone_since: Option<std::time::Instant> = None;
    loop {
        if let Some(status) = runc.try_wait()? {
            return Ok(status);
        }
        let criu_children: Vec<_> = crate::procinfo::children_of(pid)
            .into_iter()
            .filter_map(|c| crate::procinfo::stat(c as i32))
            .filter(|stat| stat.comm == "criu")
            .collect();
        // runc may run a short `criu swrk` (its feature check) before the
        // one that restores: once runc reaped the one watched, the next
        // live one is. (Not while the watched one is a zombie: the helpers
        // a killed CRIU leaves to runc carry its command line too.)
        let watched_present = swrk.is_some_and(|s| criu_children.iter().any(|stat| stat.pid as u32 == s));
        if !watched_present {
            if let Some(live) = criu_children
                .iter()
                .filter(|stat| !crate::procinfo::has_ended(stat))
                .find(|stat| crate::procinfo::cmdline(stat.pid).is_some_and(|args| args.iter().any(|a| a == b"swrk")))
            {
                swrk = Some(live.pid as u32);
            }
        }
        let ended = match swrk {
            Some(s) => criu_children.iter().find(|stat| stat.pid as u32 == s).is_none_or(crate::procinfo::has_ended),
            // Killed before it was seen: a CRIU zombie runc does not reap.
            None => criu_children.iter().any(crate::procinfo::has_ended),
        };
        match (ended, gone_since) {
            (true, None) => gone_since = Some(std::time::Instant::now()),
            (true, Some(t)) if t.elapsed() > CRIU_GONE_GRACE => {
                eprintln!(
                    "ctmigrate: runc (pid {pid}) waited {} s on a CRIU that ended (swrk {swrk:?}, criu children {:?}): stopping it",
                    CRIU_GONE_GRACE.as_secs(),
                    criu_children.iter().map(|s| (s.pid, s.state)).collect::<Vec<_>>()
                );
                let _ = runc.kill();
                return runc.wait();
            }
            (false, _) => gone_since = None,
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runc root holding a state file for this test process as init.
    fn root_with_state(start: u64) -> (tempfile::TempDir, Runc) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("c1")).unwrap();
        let state = serde_json::json!({
            "id": "c1",
            "init_process_pid": std::process::id(),
            "init_process_start": start,
            "config": {"rootfs": "/"},
        });
        std::fs::write(dir.path().join("c1/state.json"), state.to_string()).unwrap();
        let runc = Runc::new(Path::new("/nonexistent/runc"), dir.path());
        (dir, runc)
    }

    #[test]
    fn a_live_init_is_found_without_running_runc_and_a_reused_pid_is_not() {
        let start = crate::procinfo::stat(std::process::id() as i32).unwrap().starttime;
        let (_dir, runc) = root_with_state(start);
        assert_eq!(runc.live_init_pid("c1").unwrap(), std::process::id() as i32);
        // Same pid, another start time: a different process now.
        let (_dir, runc) = root_with_state(start + 1);
        assert!(matches!(runc.live_init_pid("c1"), Err(RuntimeError::NotRunning { .. })));
    }
}

