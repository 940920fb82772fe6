//! The destination's bundle: config.json rebuilt under the receiver's
//! policy, never taken from the sender as it is.

use std::path::Path;

use oci_spec::runtime::Spec;

use crate::RuntimeError;

/// Container ids: what runc accepts, and safe as a path component.
pub fn validate_container_id(id: &str) -> Result<(), RuntimeError> {
    let bad = |reason| Err(RuntimeError::InvalidId { id: id.to_string(), reason });
    if id.is_empty() || id.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if id == "." || id == ".." || id.starts_with('.') {
        return bad("must not start with a dot");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+')) {
        return bad("may contain only letters, digits and _ - . +");
    }
    Ok(())
}

/// File in the destination bundle with CRIU options for `runc restore`.
pub const CRIU_RESTORE_CONFIG: &str = "criu-restore.conf";

/// Marker in a bundle a receiver staged and has not committed yet (it
/// holds the receiver's pid): what is built for such a copy is the
/// migration's to remove, not the container's hooks'.
pub const INCOMPLETE_MARKER: &str = ".ctmigrate-incomplete";

/// What the receiver allows and imposes on a migrated container.
#[derive(Debug, Clone)]
pub struct BundlePolicy {
    /// Parent of the container's cgroup on the destination, e.g. `/ctmigrate`.
    pub cgroup_parent: String,
    /// Host directories whose contents containers may bind-mount. Others
    /// are refused: a sender must not choose what of this host a
    /// container sees.
    pub allowed_bind_sources: Vec<std::path::PathBuf>,
    /// The network namespace the receiver built for the container, which
    /// replaces the sender's (a path there, or a namespace of its own).
    pub network_namespace: Option<std::path::PathBuf>,
    /// The IPC namespace the receiver made for the container's pod, which
    /// replaces the sender's (see container-network's `ipcns`).
    pub ipc_namespace: Option<std::path::PathBuf>,
    /// The receiver's own poststop hook (program, argv), which removes
    /// what it built for the container when the container is deleted.
    pub poststop_hook: Option<(std::path::PathBuf, Vec<String>)>,
}

/// Whether a hook is one of ctmigrate's own network hooks, which the
/// receiver replaces by its own network set-up rather than running.
fn is_ctmigrate_hook(h: &oci_spec::runtime::Hook) -> bool {
    let named = h.path().file_name().and_then(|n| n.to_str()) == Some("ctmigrate");
    named && h.args().as_ref().and_then(|a| a.get(1)).map(String::as_str) == Some("hook")
}

impl BundlePolicy {
    /// Builds the destination's config.json from the sender's, for a bundle
    /// at `bundle`. Returns it with the CRIU configuration file to write at
    /// `bundle/`[`CRIU_RESTORE_CONFIG`].
    pub fn destination_config(
        &self,
        source: &serde_json::Value,
        dest_id: &str,
        bundle: &Path,
    ) -> Result<(Spec, String), RuntimeError> {
        let mut spec: Spec = serde_json::from_value(source.clone())
            .map_err(|e| RuntimeError::Config(format!("the sender's config.json is not a valid OCI runtime config: {e}")))?;

        let mut root = spec.root().clone().ok_or_else(|| RuntimeError::Config("config.json has no root".into()))?;
        root.set_path("rootfs".into());
        spec.set_root(Some(root));

        // Hooks run as root on this host: they come only from local policy.
        // ctmigrate's own network hooks are dropped (the receiver rebuilds
        // the network itself); any other hook is refused.
        if let Some(hooks) = spec.hooks() {
            let all = [hooks.prestart(), hooks.create_runtime(), hooks.create_container(), hooks.start_container(), hooks.poststart(), hooks.poststop()];
            if all.iter().flat_map(|l| l.iter().flatten()).any(|h| !is_ctmigrate_hook(h)) {
                return Err(RuntimeError::Config(
                    "the container's config.json has hooks, and a receiver never runs hooks chosen by the sender: remove them before migrating".into(),
                ));
            }
        }
        spec.set_hooks(None);
        if let Some((path, args)) = &self.poststop_hook {
            let hook = oci_spec::runtime::HookBuilder::default()
                .path(path.clone())
                .args(args.clone())
                .build()
                .map_err(|e| RuntimeError::Config(e.to_string()))?;
            let hooks = oci_spec::runtime::HooksBuilder::default()
                .poststop(vec![hook])
                .build()
                .map_err(|e| RuntimeError::Config(e.to_string()))?;
            spec.set_hooks(Some(hooks));
        }

        // `org.criu.*` annotations steer CRIU (config files, options): the
        // sender's go, and the receiver sets its own.
        let mut annotations: std::collections::HashMap<String, String> = spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("org.criu."))
            .collect();

        let mut linux = spec.linux().clone().ok_or_else(|| RuntimeError::Config("config.json has no linux section".into()))?;
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        for ns in namespaces.iter_mut() {
            if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
                if let Some(own) = &self.network_namespace {
                    ns.set_path(Some(own.clone()));
                    continue;
                }
            }
            if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc {
                if let Some(own) = &self.ipc_namespace {
                    ns.set_path(Some(own.clone()));
                    continue;
                }
            }
            if let Some(p) = ns.path() {
                return Err(RuntimeError::Config(format!(
                    "the container joins an existing {:?} namespace ({}); ctmigrate cannot recreate that namespace on the destination",
                    ns.typ(),
                    p.display()
                )));
            }
        }
        if let Some(own) = &self.ipc_namespace {
            if !namespaces.iter().any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc) {
                return Err(RuntimeError::Config(format!(
                    "the container is to join its pod's IPC namespace ({}), but uses the host's",
                    own.display()
                )));
            }
        }
        linux.set_namespaces(Some(namespaces));
        // Device nodes and device cgroup rules open host hardware to the
        // container: never on a sender's word.
        if let Some(devices) = linux.devices().as_ref().filter(|d| !d.is_empty()) {
            let paths: Vec<String> = devices.iter().map(|d| d.path().display().to_string()).collect();
            return Err(RuntimeError::Config(format!(
                "the container asks for host devices ({}), which a receiver does not take from a sender",
                paths.join(", ")
            )));
        }
        if let Some(rules) = linux.resources().as_ref().and_then(|r| r.devices().clone()) {
            if rules.iter().any(|r| r.allow()) {
                return Err(RuntimeError::Config(
                    "the container's device cgroup rules allow devices, which a receiver does not take from a sender".into(),
                ));
            }
        }
        let parent = format!("/{}", self.cgroup_parent.trim_matches('/'));
        let cgroups_path = if parent == "/" { format!("/{dest_id}") } else { format!("{parent}/{dest_id}") };
        linux.set_cgroups_path(Some(cgroups_path.clone().into()));
        spec.set_linux(Some(linux));

        // runc hands CRIU the container's new cgroup per controller name;
        // on cgroup v2 that name is empty, CRIU matches no controller with
        // it, and restores the tasks into the cgroup recorded in the images
        // (on one machine: the frozen source's). A global cgroup root, which
        // CRIU takes from its configuration file, applies to every
        // controller and puts them where runc expects them.
        let criu_config = format!("cgroup-root {cgroups_path}\n");
        annotations.insert("org.criu.config".into(), bundle.join(CRIU_RESTORE_CONFIG).display().to_string());
        spec.set_annotations(Some(annotations));

        if let Some(mounts) = spec.mounts() {
            for m in mounts {
                let is_bind = m.typ().as_deref() == Some("bind")
                    || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    continue;
                }
                let src = m.source().clone().unwrap_or_default();
                if !self.allowed_bind_sources.iter().any(|a| src.starts_with(a)) {
                    return Err(RuntimeError::Config(format!(
                        "the container bind-mounts {} from the host (at {}), which the receiver does not allow: allow it with `receive --allow-bind-source`",
                        src.display(),
                        m.destination().display()
                    )));
                }
                if !Path::new(&src).exists() {
                    return Err(RuntimeError::Config(format!(
                        "bind mount source {} (for {}) does not exist on the destination: create it there first",
                        src.display(),
                        m.destination().display()
                    )));
                }
            }
        }
        Ok((spec, criu_config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_config() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2-dev",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
            "root": {"path": "/var/lib/src/bundle/rootfs", "readonly": false},
            "annotations": {"org.criu.config": "/etc/evil.conf", "app": "web"},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}],
                "cgroupsPath": "/source/web"
            }
        })
    }

    #[test]
    fn destination_config_applies_policy() {
        let policy = BundlePolicy { cgroup_parent: "ctmigrate".into(), allowed_bind_sources: vec![], network_namespace: None, ipc_namespace: None, poststop_hook: None };
        let (spec, criu) = policy.destination_config(&source_config(), "web2", Path::new("/b/web2")).unwrap();
        assert_eq!(criu, "cgroup-root /ctmigrate/web2\n");
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("rootfs"));
        assert!(spec.hooks().is_none());
        let ann = spec.annotations().as_ref().unwrap();
        assert_eq!(ann.get("org.criu.config").map(String::as_str), Some("/b/web2/criu-restore.conf"));
        assert_eq!(ann.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/ctmigrate/web2"))
        );
    }

    #[test]
    fn namespace_paths_and_missing_bind_sources_are_refused() {
        let policy = BundlePolicy { cgroup_parent: "/ctmigrate".into(), allowed_bind_sources: vec!["/nonexistent".into()], network_namespace: None, ipc_namespace: None, poststop_hook: None };
        let mut cfg = source_config();
        cfg["linux"]["namespaces"] = serde_json::json!([{"type": "network", "path": "/run/netns/x"}]);
        assert!(policy.destination_config(&cfg, "a", Path::new("/b")).is_err());
        let mut cfg = source_config();
        cfg["mounts"] = serde_json::json!([{"destination": "/data", "type": "bind", "source": "/nonexistent/ctm", "options": ["rbind"]}]);
        let err = policy.destination_config(&cfg, "a", Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ctm") && err.contains("does not exist"), "{err}");
        // Outside the allowed sources: refused whether it exists or not.
        cfg["mounts"] = serde_json::json!([{"destination": "/h", "type": "bind", "source": "/etc", "options": ["rbind"]}]);
        let err = policy.destination_config(&cfg, "a", Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("does not allow"), "{err}");
        // Devices and device-allowing cgroup rules are refused.
        let mut cfg = source_config();
        cfg["linux"]["devices"] = serde_json::json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
        let err = policy.destination_config(&cfg, "a", Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("/dev/sda"), "{err}");
        let mut cfg = source_config();
        cfg["linux"]["resources"] = serde_json::json!({"devices": [{"allow": true, "access": "rwm"}]});
        let err = policy.destination_config(&cfg, "a", Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("device cgroup"), "{err}");
        // runc's default rule (deny all) passes.
        let mut cfg = source_config();
        cfg["linux"]["resources"] = serde_json::json!({"devices": [{"allow": false, "access": "rwm"}]});
        policy.destination_config(&cfg, "a", Path::new("/b")).unwrap();
        // Hooks are refused, with the reason.
        let mut cfg = source_config();
        cfg["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/evil"}]});
        let err = policy.destination_config(&cfg, "a", Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("hooks"), "{err}");
    }

    #[test]
    fn the_receivers_network_namespace_and_hook_replace_the_senders() {
        let policy = BundlePolicy {
            cgroup_parent: "/ctmigrate".into(),
            allowed_bind_sources: vec![],
            network_namespace: Some("/run/netns/ctmigrate-a".into()),
            ipc_namespace: None,
            poststop_hook: Some(("/usr/local/bin/ctmigrate".into(), vec!["ctmigrate".into(), "hook".into(), "remove-netns".into()])),
        };
        let mut cfg = source_config();
        cfg["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "network", "path": "/run/netns/source-side"}]);
        cfg["hooks"] = serde_json::json!({"createRuntime": [{"path": "/opt/bin/ctmigrate", "args": ["ctmigrate", "hook", "attach", "--bridge", "br0"]}]});
        let (spec, _) = policy.destination_config(&cfg, "a", Path::new("/b")).unwrap();
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let net = ns.iter().find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network).unwrap();
        assert_eq!(net.path().as_deref(), Some(Path::new("/run/netns/ctmigrate-a")));
        let hooks = spec.hooks().as_ref().unwrap();
        assert!(hooks.create_runtime().is_none());
        let post = hooks.poststop().as_ref().unwrap();
        assert_eq!(post[0].args().as_ref().unwrap()[2], "remove-netns");
        // Without a namespace of the receiver's, a path is still refused,
        // and a foreign hook next to ctmigrate's is refused.
        let plain = BundlePolicy { network_namespace: None, poststop_hook: None, ..policy.clone() };
        assert!(plain.destination_config(&cfg, "a", Path::new("/b")).is_err());
        cfg["hooks"]["poststop"] = serde_json::json!([{"path": "/bin/sh", "args": ["sh", "hook"]}]);
        assert!(policy.destination_config(&cfg, "a", Path::new("/b")).is_err());
    }

    #[test]
    fn a_pods_ipc_namespace_replaces_the_senders_and_is_refused_otherwise() {
        let policy = BundlePolicy {
            cgroup_parent: "/ctmigrate".into(),
            allowed_bind_sources: vec![],
            network_namespace: Some("/run/netns/ctmigrate-pause".into()),
            ipc_namespace: Some("/run/ctmigrate/ipcns/pause".into()),
            poststop_hook: None,
        };
        let mut cfg = source_config();
        cfg["linux"]["namespaces"] = serde_json::json!([{"type": "network", "path": "/proc/7/ns/net"}, {"type": "ipc", "path": "/proc/7/ns/ipc"}]);
        let (spec, _) = policy.destination_config(&cfg, "app", Path::new("/b")).unwrap();
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let ipc = ns.iter().find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc).unwrap();
        assert_eq!(ipc.path().as_deref(), Some(Path::new("/run/ctmigrate/ipcns/pause")));
        // The sender's path alone is refused; the host's IPC namespace
        // cannot join a pod's.
        let plain = BundlePolicy { ipc_namespace: None, ..policy.clone() };
        assert!(plain.destination_config(&cfg, "app", Path::new("/b")).is_err());
        cfg["linux"]["namespaces"] = serde_json::json!([{"type": "network"}]);
        assert!(policy.destination_config(&cfg, "app", Path::new("/b")).is_err());
    }

    #[test]
    fn container_ids() {
        for ok in ["web", "a.b-c_d+1", "X"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_container_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
