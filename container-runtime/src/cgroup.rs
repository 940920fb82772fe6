//! Freezing a container's cgroup: the v1 freezer controller
//! (`freezer.state`) or cgroup v2 (`cgroup.freeze` / `cgroup.events`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{RuncInternalState, RuntimeError};

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CgroupVersion {
    /// v1 controllers (possibly with a v2 hierarchy beside them: "hybrid").
    V1,
    /// Only the unified v2 hierarchy at /sys/fs/cgroup.
    V2,
}

impl CgroupVersion {
    pub fn as_u8(self) -> u8 {
        match self {
            CgroupVersion::V1 => 1,
            CgroupVersion::V2 => 2,
        }
    }
}

/// v2 if /sys/fs/cgroup is itself a cgroup2 mount, else v1.
pub fn cgroup_version() -> CgroupVersion {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezerState {
    Thawed,
    Freezing,
    Frozen,
}

/// The freezer of one container's cgroup.
#[derive(Debug, Clone)]
pub struct Freezer {
    /// The cgroup directory (v1: in the freezer hierarchy).
    pub path: PathBuf,
    pub version: CgroupVersion,
}

const POLL: Duration = Duration::from_millis(1);

impl Freezer {
    /// The freezer of a runc container: its v1 `freezer` path if it has
    /// one, else its unified (v2) path.
    pub fn for_container(state: &RuncInternalState) -> Result<Self, RuntimeError> {
        if let Some(p) = state.cgroup_paths.get("freezer") {
            return Ok(Self { path: p.clone(), version: CgroupVersion::V1 });
        }
        if let Some(p) = state.cgroup_paths.get("") {
            return Ok(Self { path: p.clone(), version: CgroupVersion::V2 });
        }
        Err(RuntimeError::Cgroup {
            path: PathBuf::from("/sys/fs/cgroup"),
            reason: format!("container `{}` has neither a v1 freezer nor a v2 cgroup path", state.id),
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn read(&self, name: &str) -> Result<String, RuntimeError> {
        std::fs::read_to_string(self.file(name)).map_err(|e| RuntimeError::Cgroup {
            path: self.file(name),
            reason: e.to_string(),
        })
    }

    fn write(&self, name: &str, value: &str) -> Result<(), RuntimeError> {
        std::fs::write(self.file(name), value).map_err(|e| RuntimeError::Cgroup {
            path: self.file(name),
            reason: e.to_string(),
        })
    }

    /// The processes in the cgroup now (none if it cannot be read).
    pub fn pids(&self) -> Vec<i32> {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        procs.lines().filter_map(|pid| pid.trim().parse().ok()).collect()
    }

    pub fn state(&self) -> Result<FreezerState, RuntimeError> {
        match self.version {
            CgroupVersion::V1 => match self.read("freezer.state")?.trim() {
                "THAWED" => Ok(FreezerState::Thawed),
                "FREEZING" => Ok(FreezerState::Freezing),
                "FROZEN" => Ok(FreezerState::Frozen),
                other => Err(RuntimeError::Cgroup {
                    path: self.file("freezer.state"),
                    reason: format!("unknown state `{other}`"),
                }),
            },
            CgroupVersion::V2 => {
                let want = self.read("cgroup.freeze")?.trim() == "1";
                let frozen = self
                    .read("cgroup.events")?
                    .lines()
                    .any(|l| l.trim() == "frozen 1");
                Ok(match (want, frozen) {
                    (_, true) => FreezerState::Frozen,
                    (true, false) => FreezerState::Freezing,
                    (false, false) => FreezerState::Thawed,
                })
            }
        }
    }

    /// Freezes and waits until every task is frozen. If that does not happen
    /// within `timeout`, thaws again and fails: a half-frozen container is
    /// never left behind.
    pub fn freeze(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let start = Instant::now();
        loop {
            match self.version {
                CgroupVersion::V1 => self.write("freezer.state", "FROZEN")?,
                CgroupVersion::V2 => self.write("cgroup.freeze", "1")?,
            }
            if self.state()? == FreezerState::Frozen {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let _ = self.thaw();
                return Err(RuntimeError::FreezeTimeout {
                    path: self.path.clone(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Thaws and waits until the cgroup reports thawed.
    pub fn thaw(&self) -> Result<(), RuntimeError> {
        let start = Instant::now();
        loop {
            match self.version {
                CgroupVersion::V1 => self.write("freezer.state", "THAWED")?,
                CgroupVersion::V2 => self.write("cgroup.freeze", "0")?,
            }
            if self.state()? == FreezerState::Thawed {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(RuntimeError::Cgroup {
                    path: self.path.clone(),
                    reason: "did not thaw within 10 s".into(),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}
