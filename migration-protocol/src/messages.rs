//! Message payloads. Control messages are JSON; `ImageData` is binary.

use serde::{Deserialize, Serialize};

use crate::frame::MessageKind;
use crate::ProtocolError;

/// First frame from the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u32,
    pub max_version: u32,
    /// `ctmigrate X.Y.Z`, for messages and the audit log.
    pub software: String,
}

/// The receiver's answer to [`Hello`]: the chosen protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u32,
    pub software: String,
}

/// What is about to be migrated. The receiver checks all of it before the
/// source is frozen, and may refuse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Names this migration in both hosts' journals and in queries.
    pub migration_id: String,
    pub container_id: String,
    /// Id the container gets on the destination.
    pub dest_id: String,
    /// The container's OCI runtime config (config.json). The receiver builds
    /// its own config from it under its own policy.
    pub oci_config: serde_json::Value,
    pub criu_version: String,
    pub kernel: String,
    pub arch: String,
    pub cgroup_version: u8,
    /// `stop-copy`, `precopy`, `postcopy` or `hybrid` (pre-copy rounds,
    /// then post-copy).
    pub mode: String,
    /// Most pre-dump rounds the sender may send.
    #[serde(default)]
    pub max_rounds: u32,
    pub tcp_established: bool,
    pub source_host: String,
    /// The container's interfaces and routes, when its network namespace
    /// is external to the dump: the receiver rebuilds them (validating
    /// every field) and restores the container into the new namespace.
    #[serde(default)]
    pub network: Option<NetworkWire>,
    /// Resident memory of the container's processes, for the receiver to
    /// decide where to stage the images (an estimate, never trusted as a
    /// limit).
    #[serde(default)]
    pub memory_bytes: u64,
    /// tmpfs mounts of the container that were empty at preflight. Those
    /// still empty once frozen are external to the final dump under
    /// `ctmigrate-tmpfs-<index>` (their index here; container-runtime's
    /// `EmptyTmpfs::external_key`), and the receiver provides a new tmpfs
    /// with the same options for each (validated).
    #[serde(default)]
    pub empty_tmpfs: Vec<EmptyTmpfsWire>,
    /// Version 6: the container is one member of a pod, moved with the
    /// others in migrations of their own, one connection each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodWire>,
}

/// Wire format of the Manifest's `pod`: containers that share a network
/// namespace, an IPC namespace or both, and move as one unit. With
/// `shares_network`, the leader's manifest alone carries the namespace's
/// record (`network`); the destination builds it once and every member
/// is restored into it (without, each member's manifest carries its own).
/// With `shares_ipc` (version 7), the destination makes one IPC namespace
/// when the leader arrives, and every member is restored into it. The
/// first Commit of any member commits the pod, and the first failure of
/// any member before that aborts it: the destination then commits, or
/// removes, every member.
/// `{"id": "...", "leader": "pause", "members": ["pause", "app"],
/// "shares_network": true, "shares_ipc": true}`. Unchecked as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodWire {
    /// Names the pod's migration (made by the sender, unique).
    pub id: String,
    /// Destination id of the member whose manifest carries the network.
    pub leader: String,
    /// Destination ids of every member, the leader included.
    pub members: Vec<String>,
    /// The members share one network namespace (version 6's only kind of
    /// pod, hence the default).
    #[serde(default = "yes")]
    pub shares_network: bool,
    /// The members share one IPC namespace (version 7).
    #[serde(default)]
    pub shares_ipc: bool,
}

fn yes() -> bool {
    true
}

impl PodWire {
    /// The protocol version that can carry this pod: a receiver of an
    /// older one would restore its members in IPC namespaces of their own.
    pub fn needs_version(&self) -> u32 {
        if self.shares_ipc || !self.shares_network {
            crate::PROTOCOL_VERSION_IPC_PODS
        } else {
            crate::PROTOCOL_VERSION_PODS
        }
    }
}

/// The modes a Manifest may name.
pub const MODES: [&str; 4] = ["stop-copy", "precopy", "postcopy", "hybrid"];

impl Manifest {
    /// Whether memory comes after the restore (post-copy or hybrid).
    pub fn postcopy(&self) -> bool {
        matches!(self.mode.as_str(), "postcopy" | "hybrid")
    }
}

// The records a Manifest carries are wire formats of their own: the
// protocol crate knows nothing of the crates that record, check and
// rebuild them (container-network, container-runtime). Those crates
// convert their domain types to and from these (`From` impls there), and
// the receiver validates what it converted, as for any peer input. Field
// names and shapes are the wire format: renaming or retyping one changes
// the protocol.

/// Wire format of the Manifest's `network`: the container's interfaces
/// (other than loopback) and the routes added to them.
/// `{"interfaces": [InterfaceWire], "routes": [RouteWire]}`.
/// Unchecked as received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkWire {
    pub interfaces: Vec<InterfaceWire>,
    pub routes: Vec<RouteWire>,
}

/// Wire format of one interface in [`NetworkWire`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceWire {
    /// Name inside the container, e.g. `eth0`.
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub mtu: u32,
    /// `address/prefix`, IPv4 and global IPv6.
    pub addresses: Vec<String>,
}

/// Wire format of one route in [`NetworkWire`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteWire {
    /// `default` or `address/prefix`.
    pub destination: String,
    /// An address, or `null`.
    pub gateway: Option<String>,
    /// Name of one of the record's interfaces.
    pub device: String,
    /// 4 or 6.
    pub family: u8,
}

/// Wire format of one entry of the Manifest's `empty_tmpfs`: a tmpfs of
/// the container, empty at preflight.
/// `{"mountpoint": "/dev/shm", "options": ["size=65536k"], "read_only": false}`.
/// Unchecked as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyTmpfsWire {
    /// Where it is mounted, as the container sees it.
    pub mountpoint: String,
    /// The file system's options (`size=65536k`, `mode=755`, ...).
    pub options: Vec<String>,
    /// Whether the file system itself is read-only.
    pub read_only: bool,
}

/// The receiver accepts the manifest; the sender may now freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestAccepted {
    pub bundle: String,
}

/// What a round of images is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundKind {
    /// A pre-dump while the container runs: memory only, and after the
    /// first round only what was dirtied since the round before.
    PreDump,
    /// The final dump of the frozen container, restored from.
    Final,
}

/// Starts a round of images. The ImageData that follow, up to the round's
/// ImagesDone, belong to it. Pre-dump rounds are numbered from 1; each
/// round's images refer to the previous round's (CRIU's parent images).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundBegin {
    pub round: u32,
    pub kind: RoundKind,
}

/// The receiver has a pre-dump round, verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundDone {
    pub round: u32,
    pub bytes: u64,
}

/// A piece of one CRIU image file, written at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageData<'a> {
    pub name: &'a str,
    pub offset: u64,
    pub data: &'a [u8],
}

/// Longest image file name accepted.
pub const MAX_IMAGE_NAME: usize = 255;

impl<'a> ImageData<'a> {
    /// `name_len: u16 LE | name | offset: u64 LE | data`
    pub fn encode(&self, out: &mut Vec<u8>) {
        Self::encode_prefix(self.name, self.offset, out);
        out.extend_from_slice(self.data);
    }

    /// Everything before the data, so that a sender can read the data
    /// straight into the frame after it.
    pub fn encode_prefix(name: &str, offset: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }

    /// The CRC-32C of `data`, given the CRC-32C of the whole `payload` it
    /// was decoded from: CRC-32C is linear, so the prefix's share comes
    /// out without reading the data again.
    pub fn data_crc(&self, payload: &[u8], payload_crc: u32) -> u32 {
        let prefix = &payload[..payload.len() - self.data.len()];
        crate::crc::strip_prefix(payload_crc, crc32c::crc32c(prefix), self.data.len())
    }

    pub fn decode(payload: &'a [u8]) -> Result<Self, ProtocolError> {
        let bad = |reason: &str| ProtocolError::Malformed {
            kind: MessageKind::ImageData,
            reason: reason.to_string(),
        };
        if payload.len() < 2 {
            return Err(bad("shorter than its name length"));
        }
        let name_len = u16::from_le_bytes([payload[0], payload[1]]) as usize;
        if name_len == 0 || name_len > MAX_IMAGE_NAME {
            return Err(bad("image name length out of range"));
        }
        let rest = &payload[2..];
        if rest.len() < name_len + 8 {
            return Err(bad("shorter than its name and offset"));
        }
        let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| bad("image name is not UTF-8"))?;
        let offset = u64::from_le_bytes(rest[name_len..name_len + 8].try_into().unwrap());
        Ok(Self {
            name,
            offset,
            data: &rest[name_len + 8..],
        })
    }
}

/// One image file as the sender finished it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFileSummary {
    pub name: String,
    pub size: u64,
    pub crc32c: u32,
}

/// CRIU has finished; every image file and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesDone {
    pub files: Vec<ImageFileSummary>,
    /// How long CRIU's dump took on the source, for the receiver's records.
    pub dump_ms: u64,
}

/// The destination restored the container; every task is stopped until
/// the Commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub pid: i32,
    pub restore_ms: u64,
}

/// Post-copy: the destination may run its restored copy, and keeps it
/// only while the source renews the lease: any frame from the source
/// renews it, and a LeaseRenewal is sent at least every `lease_ms / 4`. A
/// destination that hears nothing for `lease_ms` kills its copy; a source
/// that fails waits `lease_ms` plus [`LEASE_MARGIN_MS`] from its last
/// frame before it thaws, unless the destination said it removed its copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOnLease {
    pub lease_ms: u64,
}

/// What a source adds to the lease before it thaws after a failure: the
/// destination's checks run every 100 ms, and its kill takes some.
pub const LEASE_MARGIN_MS: u64 = 2_000;
/// Shortest and longest lease a destination accepts.
pub const LEASE_MIN_MS: u64 = 500;
pub const LEASE_MAX_MS: u64 = 60_000;

/// Post-copy: every page reached the destination's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesComplete {
    /// Page faults the lazy-pages daemon served (pages the copy waited
    /// for).
    pub faults: u64,
    /// Pages that came, in all, and of those how many in the background.
    pub pages: u64,
    pub background_pages: u64,
    /// From the copy being let run to the last page.
    pub after_run_ms: u64,
}

/// What became of migration `migration_id`? Sent by a source in doubt
/// instead of a Manifest, on a connection of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub migration_id: String,
    /// The container's id on the destination, for a destination that has
    /// no record of the migration.
    pub dest_id: String,
}

/// The destination's answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryAnswer {
    pub migration_id: String,
    pub decision: crate::state::PeerDecision,
}

/// Longest migration id accepted.
pub const MAX_MIGRATION_ID: usize = 64;

/// A migration id is 1 to 64 of `[0-9a-z-]`: it names journal files.
pub fn validate_migration_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_MIGRATION_ID {
        return Err(format!("migration id of {} bytes (1 to {MAX_MIGRATION_ID} expected)", id.len()));
    }
    if !id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-') {
        return Err(format!("migration id {id:?} holds characters other than 0-9, a-z and -"));
    }
    Ok(())
}

/// Either side gives up; the other rolls back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub reason: String,
}

/// Why a receiver refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    IncompatibleVersion,
    /// The manifest was refused (id taken, unsupported config, ...).
    Refused,
    /// A frame or message was invalid (checksum, size, order, path).
    BadStream,
    RestoreFailed,
    Internal,
}

/// An error report from the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_6_pod_reads_as_sharing_its_network_and_ipc_pods_need_version_7() {
        let v6: PodWire = serde_json::from_str(r#"{"id":"p","leader":"a","members":["a","b"]}"#).unwrap();
        assert!(v6.shares_network && !v6.shares_ipc);
        assert_eq!(v6.needs_version(), crate::PROTOCOL_VERSION_PODS);
        assert_eq!(PodWire { shares_ipc: true, ..v6.clone() }.needs_version(), crate::PROTOCOL_VERSION_IPC_PODS);
        assert_eq!(PodWire { shares_network: false, shares_ipc: true, ..v6 }.needs_version(), crate::PROTOCOL_VERSION_IPC_PODS);
    }

    #[test]
    fn migration_ids_cannot_name_other_files() {
        assert!(validate_migration_id("1f2e3d4c5b6a7988-web").is_ok());
        for bad in ["", "../x", "a/b", "A", "x y", &"a".repeat(65)] {
            assert!(validate_migration_id(bad).is_err(), "{bad:?}");
        }
    }

    /// The Manifest's `network` and `empty_tmpfs` as docs/protocol.md
    /// describes them: every field name and shape is pinned by parsing the
    /// documented JSON and writing it back unchanged.
    #[test]
    fn manifest_records_keep_the_documented_json() {
        let network = serde_json::json!({
            "interfaces": [{"name": "eth0", "mac": "02:42:0a:00:00:05", "mtu": 1500, "addresses": ["10.0.0.5/24", "fd00::5/64"]}],
            "routes": [
                {"destination": "default", "gateway": "10.0.0.1", "device": "eth0", "family": 4},
                {"destination": "fd01::/64", "gateway": null, "device": "eth0", "family": 6}
            ]
        });
        let tmpfs = serde_json::json!([{"mountpoint": "/dev/shm", "options": ["size=65536k", "inode64"], "read_only": false}]);
        let wire: NetworkWire = serde_json::from_value(network.clone()).unwrap();
        assert_eq!(wire.routes[1].gateway, None);
        assert_eq!(serde_json::to_value(&wire).unwrap(), network);
        let entries: Vec<EmptyTmpfsWire> = serde_json::from_value(tmpfs.clone()).unwrap();
        assert_eq!(serde_json::to_value(&entries).unwrap(), tmpfs);

        let mut manifest = serde_json::json!({
            "migration_id": "0123456789abcdef", "container_id": "web", "dest_id": "web", "oci_config": {},
            "criu_version": "4.2.1", "kernel": "6.18.0", "arch": "x86_64", "cgroup_version": 2, "mode": "stop-copy",
            "max_rounds": 0, "tcp_established": false, "source_host": "a", "memory_bytes": 0,
            "network": network, "empty_tmpfs": tmpfs
        });
        let m: Manifest = serde_json::from_value(manifest.clone()).unwrap();
        assert_eq!(serde_json::to_value(&m).unwrap(), manifest);
        // Both default when absent; a null network is none.
        let object = manifest.as_object_mut().unwrap();
        object.remove("empty_tmpfs");
        object.insert("network".into(), serde_json::Value::Null);
        let m: Manifest = serde_json::from_value(manifest).unwrap();
        assert_eq!((m.network, m.empty_tmpfs), (None, Vec::new()));
    }

    #[test]
    fn image_data_crc_comes_from_the_payload_crc() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut payload = Vec::new();
        ImageData { name: "pages-12.img", offset: 1 << 33, data: &data }.encode(&mut payload);
        let chunk = ImageData::decode(&payload).unwrap();
        assert_eq!(chunk.data_crc(&payload, crc32c::crc32c(&payload)), crc32c::crc32c(&data));
        assert_ne!(chunk.data_crc(&payload, crc32c::crc32c(&payload) ^ 1), crc32c::crc32c(&data));
    }
}
