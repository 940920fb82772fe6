//! Arbitrary bytes as a manifest: parsing, the receiver's checks of what
//! it carries (the container id, the network record and empty tmpfs
//! entries converted from the protocol's wire types, as the receiver
//! converts them) and its config policy must never panic.
#![no_main]

use std::path::Path;

use container_network::NetworkRecord;
use container_runtime::{validate_container_id, BundlePolicy, EmptyTmpfs};
use libfuzzer_sys::fuzz_target;
use migration_protocol::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else { return };
    let _ = migration_protocol::validate_migration_id(&m.migration_id);
    let _ = validate_container_id(&m.dest_id);
    if let Some(record) = m.network.clone().map(NetworkRecord::from) {
        if record.validate().is_ok() {
            let _ = record.ipv4_addresses();
        }
    }
    for tmpfs in m.empty_tmpfs.iter().cloned().map(EmptyTmpfs::from) {
        let _ = tmpfs.validate();
    }
    let policy = BundlePolicy {
        cgroup_parent: "/ctmigrate".into(),
        allowed_bind_sources: vec!["/srv".into()],
        network_namespace: None,
        poststop_hook: None,
    };
    let _ = policy.destination_config(&m.oci_config, &m.dest_id, Path::new("/nonexistent/bundle"));
});
