//! `ctmigrate hook`: OCI runtime hooks (state JSON on stdin); see
//! docs/hooks.md.

use std::process::ExitCode;

use super::{exit, fail};

#[derive(clap::Subcommand)]
pub enum HookCommand {
    /// createRuntime hook: a veth pair from the container's network
    /// namespace to a bridge, with addresses and a default route.
    Attach {
        /// Bridge the host end joins.
        #[arg(long)]
        bridge: String,
        /// ADDR/PREFIX inside the container (repeatable).
        #[arg(long = "address", required = true)]
        addresses: Vec<String>,
        /// Default gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// MAC inside the container (default: derived from the container id).
        #[arg(long)]
        mac: Option<String>,
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Interface name inside the container.
        #[arg(long, default_value = "eth0")]
        ifname: String,
    },
    /// poststop hook: remove the host end `attach` made.
    Detach,
    /// poststop hook a receiver adds to migrated containers: remove the
    /// network namespace it built for them.
    RemoveNetns {
        /// The container is a member of the pod this container leads: the
        /// pod's namespace goes when no member runs in it any more.
        #[arg(long)]
        pod_leader: Option<String>,
    },
}

impl HookCommand {
    pub fn run(self) -> ExitCode {
        let state = match runtime_hooks::HookState::read(std::io::stdin().lock()) {
            Ok(s) => s,
            Err(e) => return fail(e, exit::USAGE),
        };
        let done = match self {
            HookCommand::Attach { bridge, addresses, gateway, mac, mtu, ifname } => {
                runtime_hooks::attach(&state, &runtime_hooks::AttachOptions { bridge, ifname, addresses, gateway, mac, mtu })
            }
            HookCommand::Detach => runtime_hooks::detach(&state),
            HookCommand::RemoveNetns { pod_leader } => runtime_hooks::remove_netns(&state, pod_leader.as_deref()),
        };
        match done {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => fail(format!("hook for container `{}`: {e}", state.id), exit::INTERNAL),
        }
    }
}
