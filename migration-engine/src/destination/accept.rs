//! Accepting a migration: its manifest checked (ids, OCI configuration,
//! network, tmpfs, versions), admitted beside the migrations in flight
//! ([`super::admission`]), staged ([`super::staging`]: bundle, images
//! tmpfs, network, CRIU's configuration with the fence) and accepted. A
//! refusal here leaves the source untouched and nothing behind.

use super::*;
use super::staging::existing_cgroup;

impl<'a> Session<'a> {
    /// Admission: the manifest checked, the migration admitted beside
    /// those in flight, staged (bundle, images tmpfs, network, CRIU's
    /// configuration with the fence) and accepted. A refusal here leaves
    /// the source untouched; nothing stays behind.
    pub(super) fn admit(&mut self, manifest: &Manifest, result: &mut ResultEvent, peer: &str) -> Result<(), (MigrationError, Outcome)> {
        let nothing = |e: MigrationError| (e, Outcome::NothingTouched);
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        result.container = manifest.container_id.clone();
        result.dest_id = manifest.dest_id.clone();
        #[cfg(feature = "failpoints")]
        crate::failpoints::set_scope(&manifest.dest_id);
        self.rep.emit(Event::Start {
            role: "receiver",
            container: manifest.container_id.clone(),
            dest_id: manifest.dest_id.clone(),
            peer: peer.to_string(),
            mode: manifest.mode.clone(),
            mode_reason: None,
        });
        // Admitted beside the migrations in flight: its destination id, and
        // the memory its images reserve. Refused here, the source is never
        // frozen.
        let admitted = crate::admission::REGISTRY
            .admit(&self.opts.into(), &manifest.dest_id, self.opts.stage_images, image_memory(manifest))
            .map_err(|e| refused(e.to_string()))?;
        if !migration_protocol::MODES.contains(&manifest.mode.as_str()) {
            return Err(refused(format!("unknown migration mode `{}` (this receiver knows {})", manifest.mode, migration_protocol::MODES.join(", "))));
        }
        if manifest.postcopy() {
            if self.version < migration_protocol::PROTOCOL_VERSION_POSTCOPY {
                return Err(refused(format!("post-copy needs protocol version {} (agreed: {})", migration_protocol::PROTOCOL_VERSION_POSTCOPY, self.version)));
            }
            if self.control.socket.is_none() {
                return Err(refused("post-copy needs a TCP connection, not --stdio".into()));
            }
        }
        let (spec, criu_config) = self.check_manifest(manifest)?;
        migration_protocol::validate_migration_id(&manifest.migration_id).map_err(refused)?;
        if let Some(pod) = &manifest.pod {
            self.pod = Some(super::pods::PodSeat::take(pod, &manifest.dest_id, self.host.clone()).map_err(refused)?);
        }
        result.migration_id = Some(manifest.migration_id.clone());
        if self.journal.load(Role::Destination, &manifest.migration_id).ok().flatten().is_some() {
            return Err(refused(format!("migration {} was already received here: a sender reusing an id is refused", manifest.migration_id)));
        }
        let mut staging = Staging::create(self.opts, self.host.clone(), &manifest.dest_id).map_err(nothing)?;
        let in_memory = admitted.in_memory();
        staging.admission = Some(admitted);
        // The manifest's wire records as the domain types (checked by
        // check_manifest, on the same conversion).
        let network: Option<NetworkRecord> = manifest.network.clone().map(Into::into);
        let plan = DestinationPlan {
            runtime_root: self.opts.runtime_root.clone(),
            runc_binary: self.opts.runc_binary.clone(),
            bundle: staging.bundle.clone(),
            work_dir: staging.work_dir.clone(),
            network: network.clone(),
            pod: manifest.pod.as_ref().map(|p| p.id.clone()),
        };
        self.entry = Some(Entry::new(
            &manifest.migration_id,
            &manifest.container_id,
            &manifest.dest_id,
            peer,
            Side::Destination { state: DestinationState::AwaitingManifest, plan },
        ));
        self.staging = Some(staging);
        self.step(DestinationEvent::Admitted).map_err(nothing)?;
        let mut staging = self.staging.take().expect("just set");
        let memory_bytes = image_memory(manifest);
        if let Some(size) = crate::scratch::memory_stage_size(crate::scratch::StageMode::Memory, memory_bytes).filter(|_| in_memory) {
            crate::scratch::mount_tmpfs(&staging.images, size).map_err(nothing)?;
            staging.reserve =
                Some(crate::scratch::Reserve::create(&staging.images, memory_bytes).map_err(|e| refused(e.to_string()))?);
            staging.restore_block = Some(
                crate::scratch::Reserve::create_named(
                    &staging.images,
                    "restore-block",
                    crate::scratch::restore_block_bytes(memory_bytes),
                )
                .map_err(|e| refused(e.to_string()))?,
            );
        }
        // A pod's namespaces are the pod's, removed after its last
        // member's session (see pods::PodSeat); a container's alone go
        // with its staging.
        let pod_leader = manifest.pod.as_ref().filter(|p| p.leader == manifest.dest_id);
        let mut pod_namespaces = super::pods::PodNamespaces::default();
        if let Some(record) = &network {
            // Built now, before the source freezes; the host ends stay down
            // until the container is restored.
            self.host
                .build_network(record, &manifest.dest_id, self.opts.bridge.as_deref())
                .map_err(|e| refused(format!("cannot rebuild the container's network: {e}")))?;
            match pod_leader.filter(|p| p.shares_network) {
                Some(pod) => {
                    pod_namespaces.network = Some(record.clone());
                    super::pods::PODS.hold(&pod.id, pod_namespaces.clone());
                }
                None => staging.network = Some(record.clone()),
            }
        }
        if let Some(pod) = pod_leader.filter(|p| p.shares_ipc) {
            self.host
                .make_pod_ipc_namespace(&pod.leader)
                .map_err(|e| refused(format!("cannot make the pod's IPC namespace: {e}")))?;
            pod_namespaces.ipc = true;
            super::pods::PODS.hold(&pod.id, pod_namespaces);
        }
        let mut criu_config = criu_config;
        for (index, tmpfs) in manifest.empty_tmpfs.iter().cloned().map(EmptyTmpfs::from).enumerate() {
            let dir = staging.mount_empty_tmpfs(index, &tmpfs).map_err(nothing)?;
            criu_config.push_str(&format!("external mnt[{}]:{}\n", EmptyTmpfs::external_key(index), dir.display()));
        }
        let config_path = staging.bundle.join("config.json");
        spec.save(&config_path)
            .map_err(|e| nothing(MigrationError::Other(format!("writing {}: {e}", config_path.display()))))?;
        // The fence: the restore leaves every task stopped until Commit.
        criu_config.push_str(LEAVE_STOPPED);
        std::fs::write(staging.bundle.join(container_runtime::bundle::CRIU_RESTORE_CONFIG), criu_config)
            .map_err(|e| nothing(MigrationError::io("writing the CRIU restore configuration")(e)))?;
        let bundle = staging.bundle.display().to_string();
        self.staging = Some(staging);
        self.writer
            .write_json(MessageKind::ManifestAccepted, &ManifestAccepted { bundle })
            .map_err(|e| resumed(e.into()))?;
        self.writer.flush().map_err(|e| resumed(e.into()))?;
        failpoint!("receiver-after-manifest").map_err(resumed)?;
        Ok(())
    }

    /// Everything is checked before the sender freezes anything.
    pub(super) fn check_manifest(&self, m: &Manifest) -> Result<(container_runtime::Spec, String), (MigrationError, Outcome)> {
        validate_container_id(&m.dest_id).map_err(|e| refused(e.to_string()))?;
        if m.arch != std::env::consts::ARCH {
            return Err(refused(format!(
                "the container comes from an {} host; this host is {}",
                m.arch,
                std::env::consts::ARCH
            )));
        }
        match self.host.exists(&m.dest_id) {
            Ok(false) => {}
            Ok(true) => {
                return Err(refused(format!(
                    "a container `{}` already exists on the destination (runtime root {}): choose another with --dest-id, or remove it",
                    m.dest_id,
                    self.opts.runtime_root.display()
                )))
            }
            Err(e) => return Err(refused(format!("cannot query the destination's runtime: {e}"))),
        }
        let bundle = self.opts.bundle_root.join(&m.dest_id);
        if bundle.exists() {
            return Err(refused(format!(
                "bundle directory {} already exists on the destination: remove it or choose another --dest-id",
                bundle.display()
            )));
        }
        let mut policy = BundlePolicy {
            cgroup_parent: self.opts.cgroup_parent.clone(),
            allowed_bind_sources: self.opts.allowed_bind_sources.clone(),
            network_namespace: None,
            ipc_namespace: None,
            poststop_hook: None,
        };
        if let Some(record) = m.network.clone().map(NetworkRecord::from) {
            record.validate().map_err(|e| refused(e.to_string()))?;
            match (&self.opts.bridge, record.is_empty()) {
                (Some(bridge), _) => container_network::check_bridge(bridge).map_err(|e| refused(e.to_string()))?,
                (None, false) => {
                    return Err(refused(format!(
                        "the container has network interfaces ({}), but this receiver has no bridge to attach them to: start `ctmigrate receive` with --bridge NAME",
                        record.interfaces.iter().map(|i| format!("{} {}", i.name, i.addresses.join(" "))).collect::<Vec<_>>().join(", ")
                    )))
                }
                (None, true) => {}
            }
            let netns = container_network::Netns::Named(DestinationNetwork::netns_name(&m.dest_id));
            if netns.exists() {
                return Err(refused(format!(
                    "network namespace {} already exists on the destination: another container uses it; choose another --dest-id",
                    netns.path().display()
                )));
            }
            let exe = std::env::current_exe().map_err(|e| refused(format!("cannot find the ctmigrate binary for the poststop hook: {e}")))?;
            policy.network_namespace = Some(netns.path());
            // When the container is deleted, runc runs this and the
            // namespace built for it goes too.
            policy.poststop_hook = Some((exe, vec!["ctmigrate".into(), "hook".into(), "remove-netns".into()]));
        }
        if let Some(pod) = &m.pod {
            if self.version < pod.needs_version() {
                return Err(refused(format!("this pod needs protocol version {} (agreed: {})", pod.needs_version(), self.version)));
            }
            if m.postcopy() {
                return Err(refused("post-copy does not move pods".into()));
            }
            super::pods::validate(pod, &m.dest_id, m.network.is_some()).map_err(refused)?;
            if pod.shares_ipc {
                // Every member joins the IPC namespace made for the pod
                // when its leader is admitted.
                let ipc = container_network::ipcns::ipc_namespace_path(&pod.leader);
                if pod.leader == m.dest_id && ipc.exists() {
                    return Err(refused(format!("IPC namespace {} already exists on the destination: another pod uses it; choose another --dest-id", ipc.display())));
                }
                if pod.leader != m.dest_id && !ipc.exists() {
                    return Err(refused(format!("pod {}'s IPC namespace {} does not exist: its leader `{}` is sent first", pod.id, ipc.display(), pod.leader)));
                }
                policy.ipc_namespace = Some(ipc);
            }
            if pod.shares_network {
                if pod.leader != m.dest_id {
                    // A member is restored into the namespace its leader's
                    // session built (admitted first, see pods::admit).
                    let netns = container_network::Netns::Named(DestinationNetwork::netns_name(&pod.leader));
                    if !netns.exists() {
                        return Err(refused(format!("pod {}'s network namespace {} does not exist: its leader `{}` is sent first", pod.id, netns.path().display(), pod.leader)));
                    }
                    policy.network_namespace = Some(netns.path());
                }
                // Each member's deletion removes the pod's namespace, if no
                // other member runs in it any more.
                let exe = std::env::current_exe().map_err(|e| refused(format!("cannot find the ctmigrate binary for the poststop hook: {e}")))?;
                let args = ["ctmigrate", "hook", "remove-netns", "--pod-leader", &pod.leader];
                policy.poststop_hook = Some((exe, args.iter().map(|a| a.to_string()).collect()));
            }
        }
        if m.empty_tmpfs.len() > container_runtime::tmpfs::MAX_EMPTY_TMPFS {
            return Err(refused(format!("the manifest lists {} empty tmpfs mounts (at most {})", m.empty_tmpfs.len(), container_runtime::tmpfs::MAX_EMPTY_TMPFS)));
        }
        for (i, tmpfs) in m.empty_tmpfs.iter().enumerate() {
            EmptyTmpfs::from(tmpfs.clone()).validate().map_err(refused)?;
            if m.empty_tmpfs[..i].iter().any(|t| t.mountpoint == tmpfs.mountpoint) {
                return Err(refused(format!("the manifest lists the tmpfs at {} twice", tmpfs.mountpoint)));
            }
        }
        let (spec, criu_config) =
            policy.destination_config(&m.oci_config, &m.dest_id, &bundle).map_err(|e| refused(e.to_string()))?;
        if let Some(cg) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
            if let Some(existing) = existing_cgroup(&cg) {
                return Err(refused(format!(
                    "cgroup {} already exists on the destination: another container uses it; choose another --dest-id or --cgroup-parent",
                    existing.display()
                )));
            }
        }
        Ok((spec, criu_config))
    }
}

/// The memory the images will hold: a post-copy dump leaves the
/// anonymous memory out (it comes later, straight into the tasks), so
/// nothing is staged for it.
fn image_memory(manifest: &Manifest) -> u64 {
    if manifest.mode == "postcopy" {
        0
    } else {
        manifest.memory_bytes
    }
}
