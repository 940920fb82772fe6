//! OCI runtime hooks (runtime spec, "POSIX-platform Hooks"): the runtime
//! runs each hook with the container's state JSON on stdin, and a non-zero
//! exit status fails the operation (for createRuntime) or is logged (for
//! poststop).
//!
//! - [`attach`], for `createRuntime`: a veth pair from the container's
//!   network namespace to a bridge, with addresses and a default route. runc
//!   runs createRuntime hooks on `runc run`, `runc create` and `runc
//!   restore`.
//! - [`detach`], for `poststop`: removes the host end `attach` made.
//! - [`remove_netns`], for `poststop`: removes a named namespace the
//!   receiver built for a migrated container, with its host ends.
//!
//! `ctmigrate hook <name>` is the entry point; docs/hooks.md shows a
//! config.json that uses them.

use std::io::Read;

use container_network::destination::{add_routes, announce_all, check_bridge, plumb_interface};
use container_network::record::{parse_cidr, parse_mac, validate_ifname};
use container_network::{host_ifname, InterfaceRecord, Netns, NetworkError, NetworkRecord, RouteRecord};
use serde::Deserialize;

/// Prefix of the host ends that `attach` makes.
pub const HOST_END_PREFIX: &str = "ctmh";

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("reading the container state from stdin: {0}")]
    State(String),
    #[error("the state has no pid: attach must run as a createRuntime or prestart hook, while the container's namespaces exist")]
    NoPid,
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// The state the runtime passes on stdin (runtime spec, "State").
#[derive(Debug, Clone, Deserialize)]
pub struct HookState {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub pid: i32,
    pub bundle: String,
}

impl HookState {
    pub fn read(mut input: impl Read) -> Result<Self, HookError> {
        let mut text = String::new();
        input.read_to_string(&mut text).map_err(|e| HookError::State(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| HookError::State(e.to_string()))
    }
}

/// What `attach` builds.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub bridge: String,
    /// Name inside the container.
    pub ifname: String,
    /// `address/prefix`, one or more.
    pub addresses: Vec<String>,
    pub gateway: Option<String>,
    /// Derived from the container id when not given.
    pub mac: Option<String>,
    pub mtu: u32,
}

/// The host end `attach` makes for container `id`.
pub fn host_end(id: &str) -> String {
    host_ifname(HOST_END_PREFIX, id, 0)
}

/// A locally administered unicast MAC derived from the container id, so a
/// restored container keeps its MAC without one being configured.
pub fn derived_mac(id: &str) -> String {
    let h = container_network::host_ifname("", id, 0);
    let hex = &h[..8];
    format!("02:42:{}:{}:{}:{}", &hex[0..2], &hex[2..4], &hex[4..6], &hex[6..8])
}

impl AttachOptions {
    fn record(&self, id: &str) -> Result<NetworkRecord, HookError> {
        validate_ifname(&self.ifname)?;
        if self.addresses.is_empty() {
            return Err(HookError::Usage("attach needs at least one --address ADDR/PREFIX".into()));
        }
        let mac = self.mac.clone().unwrap_or_else(|| derived_mac(id));
        parse_mac(&mac)?;
        let mut routes = Vec::new();
        if let Some(gw) = &self.gateway {
            let v6 = gw.contains(':');
            routes.push(RouteRecord { destination: "default".into(), gateway: Some(gw.clone()), device: self.ifname.clone(), family: if v6 { 6 } else { 4 } });
        }
        for a in &self.addresses {
            parse_cidr(a)?;
        }
        let record = NetworkRecord {
            interfaces: vec![InterfaceRecord { name: self.ifname.clone(), mac, mtu: self.mtu, addresses: self.addresses.clone() }],
            routes,
        };
        record.validate()?;
        Ok(record)
    }
}

/// createRuntime: wires the container's namespace to the bridge.
pub fn attach(state: &HookState, opts: &AttachOptions) -> Result<(), HookError> {
    if state.pid <= 0 {
        return Err(HookError::NoPid);
    }
    let record = opts.record(&state.id)?;
    check_bridge(&opts.bridge)?;
    let netns = Netns::Process(state.pid);
    let host = host_end(&state.id);
    // A half-made pair from an earlier failed start would block this one.
    if link_exists(&host) {
        remove_link(&host);
    }
    plumb_interface(&netns, &record.interfaces[0], &host, &opts.bridge, true)?;
    if let Err(e) = add_routes(&netns, &record.routes).and_then(|()| announce_all(&netns, &record)) {
        remove_link(&host);
        return Err(e.into());
    }
    Ok(())
}

/// poststop: removes the host end of the container's pair, if it is still
/// there (it goes by itself when the namespace dies).
pub fn detach(state: &HookState) -> Result<(), HookError> {
    remove_link(&host_end(&state.id));
    Ok(())
}

/// poststop of a migrated container: removes the namespace the receiver
/// built (named `ctmigrate-<id>`, or `ctmigrate-<pod_leader>` for a pod's
/// members) and its host ends.
///
/// Not while the copy's migration is uncommitted (its bundle holds the
/// receiver's marker): the receiver removes what it built, once the pod's
/// other members are done with it too. Nor while a process still runs in
/// a pod's namespace: another member's, whose own hook removes it last.
pub fn remove_netns(state: &HookState, pod_leader: Option<&str>) -> Result<(), HookError> {
    if std::path::Path::new(&state.bundle).join(container_runtime::bundle::INCOMPLETE_MARKER).exists() {
        return Ok(());
    }
    if let Some(leader) = pod_leader {
        container_runtime::validate_container_id(leader).map_err(|e| HookError::Usage(format!("--pod-leader: {e}")))?;
    }
    let owner = pod_leader.unwrap_or(&state.id);
    let netns = container_network::Netns::Named(container_network::DestinationNetwork::netns_name(owner));
    if pod_leader.is_some() && netns.exists() && netns.processes_inside()? > 0 {
        return Ok(());
    }
    container_network::DestinationNetwork::remove_for(owner)?;
    Ok(())
}

use container_network::destination::link_exists;

fn remove_link(name: &str) {
    let _ = container_network::destination::delete_link(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_from_the_runtime_spec() {
        let s = HookState::read(
            br#"{"ociVersion":"1.0.2","id":"web","status":"creating","pid":4422,"bundle":"/b/web","annotations":{"a":"b"}}"#.as_slice(),
        )
        .unwrap();
        assert_eq!((s.id.as_str(), s.pid, s.status.as_str()), ("web", 4422, "creating"));
        // poststop states may carry no pid.
        let s = HookState::read(br#"{"ociVersion":"1.0.2","id":"web","status":"stopped","bundle":"/b"}"#.as_slice()).unwrap();
        assert_eq!(s.pid, 0);
        assert!(HookState::read(b"not json".as_slice()).is_err());
    }

    #[test]
    fn remove_netns_leaves_an_uncommitted_copy_to_its_receiver_and_checks_the_leader() {
        let bundle = std::env::temp_dir().join(format!("ctmtest-hook-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join(container_runtime::bundle::INCOMPLETE_MARKER), "1").unwrap();
        let state = HookState { oci_version: "1.0.2".into(), id: "web".into(), status: "stopped".into(), pid: 0, bundle: bundle.display().to_string() };
        // Returns before looking for any namespace (none of these exists).
        remove_netns(&state, None).unwrap();
        remove_netns(&state, Some("../x")).unwrap();
        std::fs::remove_file(bundle.join(container_runtime::bundle::INCOMPLETE_MARKER)).unwrap();
        assert!(matches!(remove_netns(&state, Some("../x")), Err(HookError::Usage(_))));
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    #[test]
    fn attach_options_become_a_valid_record() {
        let o = AttachOptions {
            bridge: "br0".into(),
            ifname: "eth0".into(),
            addresses: vec!["10.1.0.5/24".into()],
            gateway: Some("10.1.0.1".into()),
            mac: None,
            mtu: 1500,
        };
        let r = o.record("web").unwrap();
        assert_eq!(r.interfaces[0].mac, derived_mac("web"));
        assert_eq!(r.routes[0].gateway.as_deref(), Some("10.1.0.1"));
        assert!(AttachOptions { addresses: vec![], ..o.clone() }.record("web").is_err());
        assert!(AttachOptions { addresses: vec!["10.1.0.5".into()], ..o.clone() }.record("web").is_err());
        assert!(AttachOptions { ifname: "bad name".into(), ..o }.record("web").is_err());
        assert!(host_end("a-long-container-id-indeed").len() <= 15);
    }
}
