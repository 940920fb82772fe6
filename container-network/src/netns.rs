//! Naming a network namespace: by name under /run/netns, by a process, or
//! by any path to an nsfs file.

use std::path::{Path, PathBuf};

use crate::NetworkError;

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

    /// Creates a named namespace (fails if the name is taken), loopback
    /// up, as `ip netns add` and `ip link set lo up` do: an empty file
    /// under /run/netns (a shared mount, so that the namespace shows in
    /// mount namespaces made later), and on it a bind mount of a new
    /// namespace, made by a thread of its own that then ends.
    pub fn create_named(name: &str) -> Result<Netns, NetworkError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetworkError::Invalid(format!("`{name}` is not a valid network namespace name")));
        }
        let dir = Path::new(NAMED_NETNS_DIR);
        share_netns_dir(dir)?;
        let path = dir.join(name);
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o000)
                .open(&path)
                .map_err(|source| NetworkError::Io { context: format!("creating network namespace file {}", path.display()), source })?;
        }
        let ns = Netns::Named(name.to_string());
        let target = path.clone();
        let made = std::thread::spawn(move || -> Result<(), NetworkError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetworkError::Io { context: "making a network namespace".into(), source: e.into() })?;
            nix::mount::mount(Some("/proc/thread-self/ns/net"), &target, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| NetworkError::Io { context: format!("bind-mounting a new network namespace on {}", target.display()), source: e.into() })?;
            // A new namespace's loopback is down.
            crate::rtnl::Rtnl::here()?.set_up("lo")
        })
        .join()
        .unwrap_or_else(|_| Err(NetworkError::Invalid("the thread making a network namespace panicked".into())));
        match made {
            Ok(()) => Ok(ns),
            Err(e) => {
                let _ = ns.remove();
                Err(e)
            }
        }
    }

    /// Removes a named namespace (its bind mount and file), as `ip netns
    /// del` does. The namespace itself, with the veth ends inside, goes when
    /// no process holds it. Other kinds are not ours to remove.
    pub fn remove(&self) -> Result<(), NetworkError> {
        let Some(name) = self.name() else {
            return Ok(());
        };
        let path = Path::new(NAMED_NETNS_DIR).join(&name);
        if !path.exists() {
            return Ok(());
        }
        // Not mounted (a half-made namespace) is fine: the file goes all the same.
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        std::fs::remove_file(&path).map_err(|source| NetworkError::Io { context: format!("removing network namespace {}", path.display()), source })
    }

    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// How many processes are in the namespace now.
    pub fn processes_inside(&self) -> Result<usize, NetworkError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path();
        let ns = std::fs::metadata(&path).map_err(|source| NetworkError::Io { context: format!("reading {}", path.display()), source })?;
        let rd = std::fs::read_dir("/proc").map_err(|source| NetworkError::Io { context: "reading /proc".into(), source })?;
        let inside = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            // A process that is gone by now is not inside.
            .filter_map(|e| std::fs::metadata(e.path().join("ns/net")).ok())
            .filter(|m| (m.dev(), m.ino()) == (ns.dev(), ns.ino()))
            .count();
        Ok(inside)
    }
}

/// Enters the namespace at `path`: the calling thread only, for good.
pub(crate) fn enter(path: &Path) -> Result<(), NetworkError> {
    let ns = std::fs::File::open(path).map_err(|source| NetworkError::Io { context: format!("opening {}", path.display()), source })?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetworkError::Io { context: format!("entering {}", path.display()), source: e.into() })
}

/// Makes `dir` (created if need be) a shared mount point, as `ip netns`
/// does before adding a namespace: bind-mounted on itself when it is not a
/// mount point yet.
fn share_netns_dir(dir: &Path) -> Result<(), NetworkError> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::fs::DirBuilderExt;
    let io = |context: &str| {
        let context = format!("{context} {}", dir.display());
        move |e: nix::errno::Errno| NetworkError::Io { context, source: e.into() }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| NetworkError::Io { context: format!("creating {}", dir.display()), source })?;
    let share = || mount(None::<&str>, dir, Some("none"), MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    match share() {
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some(dir), dir, Some("none"), MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(io("bind-mounting"))?;
            share().map_err(io("sharing"))
        }
        other => other.map_err(io("sharing")),
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
        assert_eq!(Netns::Path("/run/netns/web".into()).name().as_deref(), Some("web"));
        assert_eq!(Netns::Path("/var/run/netns/web".into()).name().as_deref(), Some("web"));
        assert_eq!(Netns::Path("/proc/1/ns/net".into()).name(), None);
        assert_eq!(Netns::Process(42).name(), None);
        assert_eq!(Netns::Process(42).path(), PathBuf::from("/proc/42/ns/net"));
        assert_eq!(Netns::Named("a".into()).path(), PathBuf::from("/run/netns/a"));
    }
}
