//! Naming a network namespace: by name under /run/netns, by a process, or
//! by any path to an nsfs file.

use std::path::{Path, PathBuf};

use crate::{ip, NetworkError};

/// Where `ip netns` keeps named namespaces.
pub const NAMED_NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// `/run/netns/<name>`.
    Named(String),
    /// The namespace of a running process.
    Process(i32),
    /// Any bind-mounted namespace file.
    Path(PathBuf),
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        match self {
            Netns::Named(n) => Path::new(NAMED_NETNS_DIR).join(n),
            Netns::Process(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            Netns::Path(p) => p.clone(),
        }
    }

    /// What `ip link ... netns X` accepts (a name or a pid), if any.
    pub(crate) fn ip_target(&self) -> Option<String> {
        match self {
            Netns::Process(pid) => Some(pid.to_string()),
            named => named.name(),
        }
    }

    /// The name under /run/netns, for a named namespace (by name or by
    /// its path there).
    pub fn name(&self) -> Option<String> {
        match self {
            Netns::Named(n) => Some(n.clone()),
            Netns::Path(p) => named_from_path(p),
            Netns::Process(_) => None,
        }
    }

    /// The namespace's inode, as CRIU names external namespaces.
    pub fn inode(&self) -> Result<u64, NetworkError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path();
        std::fs::metadata(&path)
            .map(|m| m.ino())
            .map_err(|source| NetworkError::Io { context: format!("reading {}", path.display()), source })
    }

    /// Creates a named namespace (fails if the name is taken).
    pub fn create_named(name: &str) -> Result<Netns, NetworkError> {
        ip(None, &["netns", "add", name])?;
        let ns = Netns::Named(name.to_string());
        // A new namespace's loopback is down.
        ip(Some(&ns), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Removes a named namespace (its bind mount and file). The namespace
    /// itself, with the veth ends inside, goes when no process holds it.
    /// Other kinds are not ours to remove.
    pub fn remove(&self) -> Result<(), NetworkError> {
        let Some(name) = self.name() else {
            return Ok(());
        };
        if !Path::new(NAMED_NETNS_DIR).join(&name).exists() {
            return Ok(());
        }
        ip(None, &["netns", "del", &name]).map(|_| ())
    }

    pub fn exists(&self) -> bool {
        self.path().exists()
    }
}

/// `name` if `path` is `/run/netns/<name>` (or `/var/run/netns/<name>`).
fn named_from_path(path: &Path) -> Option<String> {
    let parent = path.parent()?;
    let named = parent == Path::new(NAMED_NETNS_DIR) || parent == Path::new("/var/run/netns");
    named.then(|| path.file_name()?.to_str().map(str::to_string)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_paths_are_recognised() {
        assert_eq!(Netns::Path("/run/netns/web".into()).ip_target().as_deref(), Some("web"));
        assert_eq!(Netns::Path("/var/run/netns/web".into()).ip_target().as_deref(), Some("web"));
        assert_eq!(Netns::Path("/proc/1/ns/net".into()).ip_target(), None);
        assert_eq!(Netns::Process(42).ip_target().as_deref(), Some("42"));
        assert_eq!(Netns::Named("a".into()).path(), PathBuf::from("/run/netns/a"));
    }
}
