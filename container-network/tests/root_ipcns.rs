//! Root test of the IPC namespace a receiver makes for a pod (skipped,
//! with a note, when not root; failed when CTMIGRATE_REQUIRE_ROOT_TESTS=1).

use container_network::ipcns::{create_ipc_namespace, ipc_namespace_path, remove_ipc_namespace};

#[test]
fn a_pods_ipc_namespace_is_made_once_and_removed() {
    if !nix::unistd::geteuid().is_root() {
        assert_ne!(std::env::var("CTMIGRATE_REQUIRE_ROOT_TESTS").as_deref(), Ok("1"), "root test cannot run: not root");
        eprintln!("SKIPPED: not root");
        return;
    }
    let id = format!("ctmtest-ipc-{}", std::process::id());
    let path = create_ipc_namespace(&id).unwrap();
    assert_eq!(path, ipc_namespace_path(&id));
    assert!(create_ipc_namespace(&id).is_err(), "a pod's namespace is made once");
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    let own = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/ipc").unwrap());
    assert_ne!(inode, own, "not a new namespace");
    remove_ipc_namespace(&id).unwrap();
    assert!(!path.exists());
    remove_ipc_namespace(&id).expect("removing what is gone is fine");
}
