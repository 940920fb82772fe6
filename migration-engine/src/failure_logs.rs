//! CRIU's and runc's logs of a failed migration, kept where an operator can
//! read them: `failed/` beside the audit log (by default
//! /var/log/ctmigrate/failed), one directory per failed attempt, named
//! `<unix time>-<role>-<container>`. The newest [`KEEP`] are kept; older
//! ones are removed when a new one is made.

use std::path::{Path, PathBuf};

/// Failed attempts whose logs are kept, per host.
pub const KEEP: usize = 20;

/// The directory of kept logs for an audit log at `audit_log`.
pub fn dir_for(audit_log: &Path) -> PathBuf {
    audit_log.parent().unwrap_or(Path::new("/var/log/ctmigrate")).join("failed")
}

/// Copies every `*.log` and `*.stderr` file under `work_dir` into a new
/// directory under `failed`; returns it, or None if there was nothing to
/// keep or it could not be written.
pub fn keep(work_dir: &Path, failed: &Path, role: &str, container: &str) -> Option<PathBuf> {
    let logs: Vec<PathBuf> = walkdir::WalkDir::new(work_dir)
        .same_file_system(true)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "stderr"))
        .collect();
    if logs.is_empty() {
        return None;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let safe: String = container.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect();
    let dest = failed.join(format!("{now}-{role}-{safe}-{}", std::process::id()));
    std::fs::create_dir_all(&dest).ok()?;
    for log in &logs {
        let rel = log.strip_prefix(work_dir).unwrap_or(log);
        let name = rel.to_string_lossy().replace('/', "_");
        let _ = std::fs::copy(log, dest.join(name));
    }
    prune(failed, KEEP);
    Some(dest)
}

/// Removes all but the newest `keep` directories of `failed`.
fn prune(failed: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(failed) else { return };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for (_, d) in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `message` with every mention of a file under `work_dir` pointed at its
/// kept copy in `kept`, and the kept directory named at the end.
pub fn point_at_kept(message: &str, work_dir: &Path, kept: &Path) -> String {
    let work = work_dir.to_string_lossy();
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(work.as_ref()) {
        out.push_str(&rest[..i]);
        let after = &rest[i + work.len()..];
        let end = after.find(|c: char| c.is_whitespace() || c == '"' || c == ')' || c == ';' || c == ',').unwrap_or(after.len());
        let rel = after[..end].trim_start_matches('/').replace('/', "_");
        out.push_str(&kept.join(rel).to_string_lossy());
        rest = &after[end..];
    }
    out.push_str(rest);
    format!("{out} (logs kept in {})", kept.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_kept_named_in_the_message_and_bounded() {
        let work = tempfile::tempdir().unwrap();
        let failed = tempfile::tempdir().unwrap();
        std::fs::create_dir(work.path().join("work")).unwrap();
        std::fs::write(work.path().join("work/restore.log"), "Error (criu/x.c:1): boom").unwrap();
        std::fs::write(work.path().join("pages.img"), "not a log").unwrap();
        let kept = keep(work.path(), failed.path(), "receiver", "c/1").unwrap();
        assert_eq!(std::fs::read_to_string(kept.join("work_restore.log")).unwrap(), "Error (criu/x.c:1): boom");
        assert!(!kept.join("pages.img").exists());
        let msg = format!("restore failed; log file: {}/work/restore.log", work.path().display());
        let pointed = point_at_kept(&msg, work.path(), &kept);
        let named = pointed.split("log file: ").nth(1).unwrap().split(' ').next().unwrap();
        assert!(Path::new(named).is_file(), "{pointed}");

        for i in 0..KEEP + 3 {
            std::fs::create_dir(failed.path().join(format!("old-{i}"))).unwrap();
        }
        prune(failed.path(), KEEP);
        assert_eq!(std::fs::read_dir(failed.path()).unwrap().count(), KEEP);
    }
}
