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

/// What the receiver allows and imposes on a migrated container.
#[derive(Debug, Clone)]
pub struct BundlePolicy {
    /// Parent of the container's cgroup on the destination, e.g. `/ctmigrate`.
    pub cgroup_parent: String,
    /// Host directories whose contents containers may bind-mount. Others
    /// are refused: a sender must not choose what of this host a
    /// container sees.
    pub allowed_bind_sources: Vec<std::path::PathBuf>,
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
        if spec.hooks().is_some() {
            return Err(RuntimeError::Config(
                "the container's config.json has hooks, and a receiver never runs hooks chosen by the sender: remove them before migrating".into(),
            ));
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
        if let Some(namespaces) = linux.namespaces() {
            for ns in namespaces {
                if let Some(p) = ns.path() {
                    return Err(RuntimeError::Config(format!(
                        "the container joins an existing {:?} namespace ({}); ctmigrate cannot recreate that namespace on the destination",
                        ns.typ(),
                        p.display()
                    )));
                }
            }
        }
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
        let policy = BundlePolicy { cgroup_parent: "ctmigrate".into(), allowed_bind_sources: vec![] };
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
        let policy = BundlePolicy { cgroup_parent: "/ctmigrate".into(), allowed_bind_sources: vec!["/nonexistent".into()] };
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
    fn container_ids() {
        for ok in ["web", "a.b-c_d+1", "X"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_container_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
