//! Generates the CRIU RPC messages from the `rpc.proto` of the CRIU that
//! install.sh installed. The schema is CRIU's, so it is read from CRIU's own
//! installation rather than kept in this repository.

use std::path::PathBuf;

/// Where CRIU's RPC schema is looked for, in order.
const PROTO_CANDIDATES: &[&str] = &[
    "/usr/local/include/criu/rpc.proto",
    "/usr/include/criu/rpc.proto",
];

fn main() {
    println!("cargo:rerun-if-env-changed=CRIU_RPC_PROTO");
    let proto = std::env::var_os("CRIU_RPC_PROTO")
        .map(PathBuf::from)
        .or_else(|| {
            PROTO_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "CRIU's rpc.proto not found (looked at $CRIU_RPC_PROTO and {PROTO_CANDIDATES:?}): \
                 run ./install.sh, which installs CRIU and its RPC schema"
            )
        });
    println!("cargo:rerun-if-changed={}", proto.display());
    let include = proto.parent().expect("rpc.proto has a parent directory");
    prost_build::Config::new()
        .compile_protos(&[&proto], &[include])
        .expect("compiling CRIU's rpc.proto");
}
