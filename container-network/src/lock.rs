//! Locking a container's network namespace while it is dumped.
//!
//! CRIU locks a namespace it dumps itself, but an *external* namespace
//! only connection by connection, and only with --tcp-established. A
//! frozen container's kernel sockets still complete handshakes and
//! acknowledge data that the restored copy would never see, so ctmigrate
//! drops every packet in and out of the namespace from just before the
//! freeze until the source is gone (or, on rollback, thawed again). One
//! nftables table holds the lock: adding and deleting it are atomic.

use crate::{run_in, Netns, NetworkError};

/// The table that holds the lock, in the container's namespace.
pub const LOCK_TABLE: &str = "ctmigrate_lock";

/// Drops all traffic in and out of `netns` (loopback included: the
/// container is frozen anyway).
pub fn lock(netns: &Netns) -> Result<(), NetworkError> {
    let rules = format!(
        "table inet {LOCK_TABLE} {{\n\
         \tchain input {{ type filter hook input priority -400; policy drop; }}\n\
         \tchain output {{ type filter hook output priority -400; policy drop; }}\n\
         }}\n"
    );
    run_in(Some(netns), "nft", &["-f", "-"], Some(&rules)).map(|_| ())
}

/// Removes the lock. A namespace that is gone, or holds no lock, is fine.
pub fn unlock(netns: &Netns) -> Result<(), NetworkError> {
    if !netns.exists() || !is_locked(netns)? {
        return Ok(());
    }
    run_in(Some(netns), "nft", &["delete", "table", "inet", LOCK_TABLE], None).map(|_| ())
}

pub fn is_locked(netns: &Netns) -> Result<bool, NetworkError> {
    let tables = run_in(Some(netns), "nft", &["list", "tables"], None)?;
    Ok(tables.lines().any(|l| l.trim() == format!("table inet {LOCK_TABLE}")))
}
