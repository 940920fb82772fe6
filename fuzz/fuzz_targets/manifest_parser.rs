//! Arbitrary bytes as a manifest: parsing, the container id check and the
//! receiver's config policy must never panic.
#![no_main]

use std::path::Path;

use container_runtime::{validate_container_id, BundlePolicy};
use libfuzzer_sys::fuzz_target;
use migration_protocol::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else { return };
    let _ = validate_container_id(&m.dest_id);
    let policy = BundlePolicy { cgroup_parent: "/ctmigrate".into(), allowed_bind_sources: vec!["/srv".into()] };
    let _ = policy.destination_config(&m.oci_config, &m.dest_id, Path::new("/nonexistent/bundle"));
});
