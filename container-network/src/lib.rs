//! The network side of a migration.
//!
//! A container's network namespace is not migrated by CRIU: it is *external*
//! to the dump. Instead the sender [records](record::record) the
//! container's interfaces (addresses, MAC, MTU, routes), the receiver
//! [rebuilds](destination::DestinationNetwork) them in a fresh namespace
//! whose veth host ends join a bridge, and restores the container into it.
//! While the source is dumped its namespace is [locked](lock) so that no
//! packet is answered by a copy that is about to disappear; once the
//! destination runs, its new home [announces](arp) the moved addresses and
//! [nudges](nudge) the peers of moved TCP connections to retransmit now.
//!
//! Links, addresses and routes are read and written over rtnetlink
//! ([`rtnl`]), with a socket opened inside the namespace concerned by a
//! thread that entered it; no `ip` process is started for them. nftables
//! (`nft`) and the loopback-only namespace's [probe](pristine) still run as
//! processes, through `nsenter --net=`, which changes only the network
//! namespace: `ip netns exec` would also remount /sys and hide the cgroup
//! hierarchy.

pub mod arp;
pub mod destination;
pub mod ipcns;
pub mod lock;
pub mod netns;
pub mod nudge;
pub mod pristine;
pub mod record;
pub mod rtnl;
mod sys;

pub use destination::{check_bridge, DestinationNetwork};
pub use netns::Netns;
pub use record::{InterfaceRecord, NetworkRecord, RouteRecord};

use std::process::Command;

/// Errors from recording, building, locking and announcing.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot run `{program}`: {source} (run ./install.sh to install iproute2 and nftables)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("unexpected output from `{command}`: {reason}")]
    Parse { command: String, reason: String },
    /// A netlink request the kernel refused: what was asked, errno, and
    /// the kernel's own message when it gave one.
    #[error("{what} failed: {}", match .detail { Some(d) => format!("{d} ({})", .errno.desc()), None => .errno.desc().to_string() })]
    Netlink { what: String, errno: nix::errno::Errno, detail: Option<String> },
    #[error("invalid network description: {0}")]
    Invalid(String),
    #[error("{0}")]
    Bridge(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `program args` (in `netns` if given) and returns its stdout.
pub(crate) fn run_in(netns: Option<&Netns>, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetworkError> {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path().display())).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let shown = format!("{program} {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|source| NetworkError::Spawn { program: program.into(), source })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|source| NetworkError::Io { context: format!("writing to `{shown}`"), source })?;
    }
    let out = child.wait_with_output().map_err(|source| NetworkError::Spawn { program: program.into(), source })?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("").to_string();
        return Err(NetworkError::Command { command: shown, message: if message.is_empty() { out.status.to_string() } else { message } });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A host-side interface name (at most 15 bytes) derived from `key`, so
/// the same container always gets the same names and they can be found
/// again for removal.
pub fn host_ifname(prefix: &str, key: &str, index: usize) -> String {
    let name = format!("{prefix}{:08x}{index}", crc32c::crc32c(key.as_bytes()));
    name.chars().take(15).collect()
}
