//! The audit log: one JSON line per migration attempt, on both hosts.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::events::ResultEvent;

pub const DEFAULT_AUDIT_LOG: &str = "/var/log/ctmigrate/audit.log";

/// Appends the record of one attempt. A log that cannot be written is
/// reported, never fatal: the migration itself has already happened.
pub fn record(path: &Path, peer: &str, result: &ResultEvent) -> Result<(), std::io::Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let line = serde_json::json!({
        "time_unix_ms": time.as_millis() as u64,
        "role": result.role,
        "peer": peer,
        "container": result.container,
        "dest_id": result.dest_id,
        "mode": result.mode,
        "ok": result.ok,
        "bytes_sent": result.bytes_sent,
        "bytes_raw": result.bytes_raw,
        "frozen_ms": result.frozen_ms,
        "total_ms": result.total_ms,
        "source_state": result.source_state,
        "migration_id": result.migration_id,
        "error": result.error,
        "rootfs_verified": result.rootfs_verified,
        "rootfs_digest": result.rootfs.as_ref().map(|r| r.digest.as_str()).filter(|d| !d.is_empty()),
    });
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    // One write per line: concurrent appenders never interleave.
    f.write_all(format!("{line}\n").as_bytes())
}
