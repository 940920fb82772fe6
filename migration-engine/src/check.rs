//! `ctmigrate check`: can this host send and receive migrations?

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub runtime_root: PathBuf,
    pub runc_binary: PathBuf,
    pub criu_binary: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckItem {
    pub name: &'static str,
    pub ok: bool,
    /// A failed required item means migrations cannot run.
    pub required: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub checks: Vec<CheckItem>,
    /// Whether CRIU can read non-root tasks' resource limits here.
    pub rlimits: RlimitFacts,
}

/// The `rlimits` object of `check --json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RlimitFacts {
    /// This host's root has CAP_SYS_RESOURCE (CRIU's prlimit works on any task).
    pub cap_sys_resource: bool,
    /// The CRIU in use carries ctmigrate's rlimit patch (install.sh's record
    /// names this very binary and the patch).
    pub criu_rlimit_patch: bool,
    /// Containers with a task that is not all root (uid/gid) can be dumped.
    pub non_root_tasks_dumpable: bool,
}

/// Lowest CRIU that dumps sockets on kernels >= 6.16.
pub const MIN_CRIU: (u32, u32) = (4, 2);

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok || !c.required)
    }

    pub fn get(&self, name: &str) -> Option<&CheckItem> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn print(&self, json: bool) {
        if json {
            let v = serde_json::json!({"event": "check", "ok": self.ok(), "checks": self.checks, "rlimits": self.rlimits});
            println!("{v}");
            return;
        }
        for c in &self.checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok  ",
                (false, true) => "FAIL",
                (false, false) => "note",
            };
            println!("{mark} {:<16} {}", c.name, c.detail);
        }
        println!("{}", if self.ok() { "this host can migrate containers" } else { "this host cannot migrate containers: fix the FAIL lines" });
    }
}

fn item(name: &'static str, required: bool, result: Result<String, String>) -> CheckItem {
    match result {
        Ok(detail) => CheckItem { name, ok: true, required, detail },
        Err(detail) => CheckItem { name, ok: false, required, detail },
    }
}

pub fn run(opts: &CheckOptions) -> CheckReport {
    let mut checks = Vec::new();

    const NEEDED_CAPS: &[(u32, &str)] =
        &[(12, "CAP_NET_ADMIN"), (19, "CAP_SYS_PTRACE"), (21, "CAP_SYS_ADMIN"), (40, "CAP_CHECKPOINT_RESTORE")];
    let caps = crate::rlimit_support::effective_caps().unwrap_or(0);
    let missing: Vec<&str> = NEEDED_CAPS.iter().filter(|(bit, _)| caps & (1 << bit) == 0).map(|(_, n)| *n).collect();
    checks.push(item(
        "privileges",
        true,
        if nix::unistd::geteuid().is_root() && missing.is_empty() {
            Ok("root with the capabilities CRIU needs".into())
        } else {
            Err(format!("run as root (missing: {})", if missing.is_empty() { "uid 0".into() } else { missing.join(", ") }))
        },
    ));

    let version = criu_bindings::version(&opts.criu_binary);
    checks.push(item(
        "criu",
        true,
        match &version {
            Ok(v) if (v.major, v.minor) >= MIN_CRIU => Ok(format!("CRIU {v} at {}", which(&opts.criu_binary))),
            Ok(v) => Err(format!(
                "CRIU {v} is too old: {}.{} or newer is needed (older CRIU cannot dump sockets on kernels >= 6.16); run ./install.sh",
                MIN_CRIU.0, MIN_CRIU.1
            )),
            Err(e) => Err(format!("{e}")),
        },
    ));

    let features = criu_bindings::feature_check(&opts.criu_binary);
    let (soft_dirty, uffd) = match &features {
        Ok(f) => (f.mem_track, f.lazy_pages),
        Err(_) => (false, false),
    };
    checks.push(item(
        "dirty-tracking",
        false,
        if soft_dirty {
            Ok("soft-dirty memory tracking available: pre-copy possible".into())
        } else {
            Err("the kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY): only stop-copy migration is possible".into())
        },
    ));
    checks.push(item(
        "uffd",
        false,
        if uffd { Ok("userfaultfd available (lazy pages)".into()) } else { Err("no userfaultfd for lazy pages".into()) },
    ));

    checks.push(postcopy_patches_item(crate::rlimit_support::missing_postcopy_patches(
        &opts.criu_binary,
        Path::new(crate::rlimit_support::DEFAULT_MARKER),
    )));

    let (rlimit_items, rlimits) = rlimit_checks(&crate::rlimit_support::RlimitSupport::detect(&opts.criu_binary));
    checks.extend(rlimit_items);

    let runc = Command::new(&opts.runc_binary).arg("--version").output();
    checks.push(item(
        "runtime",
        true,
        match runc {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("runc").to_string()),
            Ok(o) => Err(format!("`runc --version` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Err(format!("cannot run {}: {e}; run ./install.sh", opts.runc_binary.display())),
        },
    ));

    let cg = container_runtime::cgroup_version();
    let freezer = match cg {
        container_runtime::cgroup::CgroupVersion::V1 => Path::new("/sys/fs/cgroup/freezer/freezer.state").exists()
            || Path::new("/sys/fs/cgroup/freezer/tasks").exists(),
        container_runtime::cgroup::CgroupVersion::V2 => {
            std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control").is_ok()
        }
    };
    checks.push(item(
        "cgroup-freezer",
        true,
        if freezer {
            Ok(format!("cgroup {cg:?} with a freezer"))
        } else {
            Err(format!("cgroup {cg:?} without a usable freezer: mount the v1 freezer controller or use cgroup v2"))
        },
    ));

    for (name, tool, use_, fix) in [
        ("network-lock", "nft", "the container's network is locked with nftables while it is dumped", "install nftables"),
        ("iproute2", "ip", "compares a container's loopback-only network namespace with a new one", "install iproute2"),
    ] {
        let path = which(Path::new(tool));
        checks.push(item(
            name,
            true,
            if path.starts_with('/') { Ok(format!("{tool} at {path} ({use_})")) } else { Err(format!("{tool} not found: {fix}")) },
        ));
    }

    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.contains("[always]") {
        checks.push(item(
            "huge-pages",
            false,
            Err("transparent huge pages are `always`: dirty tracking works per 2 MiB page, so pre-copy rounds may not shrink".into()),
        ));
    }

    checks.push(item(
        "runtime-root",
        true,
        match std::fs::metadata(&opts.runtime_root) {
            Ok(m) if m.is_dir() => Ok(format!("{} exists", opts.runtime_root.display())),
            Ok(_) => Err(format!("{} is not a directory", opts.runtime_root.display())),
            Err(_) => Ok(format!("{} will be created by runc", opts.runtime_root.display())),
        },
    ));
    CheckReport { checks, rlimits }
}

/// `postcopy-patches`: whether the CRIU in use carries ctmigrate's lazy
/// pages patches (not required: only `--mode postcopy|hybrid` needs them).
fn postcopy_patches_item(missing: Result<Vec<&'static str>, crate::rlimit_support::PatchStatus>) -> CheckItem {
    item(
        "postcopy-patches",
        false,
        match missing {
            Ok(missing) if missing.is_empty() => Ok("CRIU carries ctmigrate's post-copy patches 0002-0005".into()),
            Ok(missing) => Err(format!(
                "CRIU lacks ctmigrate's post-copy patches {}: --mode postcopy|hybrid would fail (or freeze longer); run ./install.sh",
                missing.join(", ")
            )),
            Err(status) => Err(format!("cannot tell whether CRIU carries ctmigrate's post-copy patches ({}); run ./install.sh", status.describe())),
        },
    )
}

/// `sys-resource`: whether root has CAP_SYS_RESOURCE, which CRIU's
/// prlimit() needs for a task of another user; without it,
/// `rlimit-patch`: whether the CRIU in use carries ctmigrate's patch that
/// reads /proc/PID/limits instead. Neither is required: containers whose
/// tasks all run as root migrate either way.
fn rlimit_checks(support: &crate::rlimit_support::RlimitSupport) -> (Vec<CheckItem>, RlimitFacts) {
    let mut items = vec![item(
        "sys-resource",
        false,
        if support.cap_sys_resource {
            Ok("root has CAP_SYS_RESOURCE: CRIU reads every task's resource limits with prlimit".into())
        } else {
            Err("root lacks CAP_SYS_RESOURCE: a stock CRIU cannot read the resource limits of a task that is not all root (uid and gid 0)".into())
        },
    )];
    if !support.cap_sys_resource {
        items.push(item(
            "rlimit-patch",
            false,
            if support.patch.is_patched() {
                Ok(format!("{}: containers with non-root tasks can be dumped", support.patch.describe()))
            } else {
                Err(format!(
                    "{}: containers with a non-root task (postgres, www-data, nobody, ...) cannot be dumped here (\"Can't get rlimit\"); run ./install.sh to build the patched CRIU",
                    support.patch.describe()
                ))
            },
        ));
    }
    let facts = RlimitFacts {
        cap_sys_resource: support.cap_sys_resource,
        criu_rlimit_patch: support.patch.is_patched(),
        non_root_tasks_dumpable: support.dumps_other_users(),
    };
    (items, facts)
}

fn which(bin: &Path) -> String {
    crate::rlimit_support::resolve_binary(bin).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rlimit_support::{PatchStatus, RlimitSupport};

    fn names(items: &[CheckItem]) -> Vec<(&str, bool)> {
        items.iter().map(|i| (i.name, i.ok)).collect()
    }

    #[test]
    fn postcopy_patch_lines() {
        let all = postcopy_patches_item(Ok(vec![]));
        assert!(all.ok && !all.required, "{}", all.detail);
        let some = postcopy_patches_item(Ok(vec![crate::rlimit_support::POSTCOPY_PATCHES[3]]));
        assert!(!some.ok && some.detail.contains("0005-") && some.detail.contains("install.sh"), "{}", some.detail);
        let unknown = postcopy_patches_item(Err(PatchStatus::NoMarker { binary: "/usr/sbin/criu".into(), marker: "/m.json".into() }));
        assert!(!unknown.ok && !unknown.required, "{}", unknown.detail);
    }

    #[test]
    fn rlimit_lines() {
        let patched = PatchStatus::Patched { binary: "/usr/local/sbin/criu".into() };
        let stock = PatchStatus::NoMarker { binary: "/usr/sbin/criu".into(), marker: "/m.json".into() };

        let (items, facts) = rlimit_checks(&RlimitSupport { cap_sys_resource: true, patch: stock.clone() });
        assert_eq!(names(&items), [("sys-resource", true)], "with the capability the patch does not matter");
        assert!(facts.non_root_tasks_dumpable && facts.cap_sys_resource && !facts.criu_rlimit_patch);

        let (items, facts) = rlimit_checks(&RlimitSupport { cap_sys_resource: false, patch: patched });
        assert_eq!(names(&items), [("sys-resource", false), ("rlimit-patch", true)]);
        assert!(facts.non_root_tasks_dumpable && facts.criu_rlimit_patch);

        let (items, facts) = rlimit_checks(&RlimitSupport { cap_sys_resource: false, patch: stock });
        assert_eq!(names(&items), [("sys-resource", false), ("rlimit-patch", false)]);
        assert!(!facts.non_root_tasks_dumpable);
        assert!(items.iter().all(|i| !i.required), "root-only containers migrate without either");
        assert!(items[1].detail.contains("non-root task") && items[1].detail.contains("install.sh"), "{}", items[1].detail);
        let report = CheckReport { checks: items, rlimits: facts };
        assert!(report.ok(), "notes do not fail the check");
    }
}
