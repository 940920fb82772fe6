//! What a container's own loopback-only namespace holds that a new one
//! does not.
//!
//! The destination's namespace is always made anew (runc restores with
//! CRIU's `empty_ns` for the network, so CRIU never brings one back), with
//! loopback up. Comparing the container's namespace with one made just now
//! names what the move leaves behind (an extra address, a route, a
//! firewall rule, a changed sysctl), so that it is reported, not lost
//! silently.

use std::collections::BTreeMap;

use crate::{run_in, Netns, NetworkError};

/// What is compared, one section each: everything CRIU's netns dump
/// carries for a loopback-only namespace (links, addresses, routes, rules,
/// firewall tables, the per-namespace sysctls it saves).
const PROBE_SCRIPT: &str = r#"
echo "@@links"; ip -j -d link show
echo "@@addresses"; ip -j addr show
echo "@@routes-ipv4"; ip -j -4 route show table all
echo "@@routes-ipv6"; ip -j -6 route show table all
echo "@@rules-ipv4"; ip -j -4 rule show
echo "@@rules-ipv6"; ip -j -6 rule show
echo "@@nftables"; nft list ruleset
echo "@@iptables-legacy"; cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null
echo "@@sysctls"; grep -r . /proc/sys/net/ipv4/conf/all /proc/sys/net/ipv4/conf/default /proc/sys/net/ipv4/conf/lo \
    /proc/sys/net/ipv6/conf/all /proc/sys/net/ipv6/conf/default /proc/sys/net/ipv6/conf/lo \
    /proc/sys/net/unix /proc/sys/net/ipv4/ping_group_range 2>/dev/null
true
"#;

/// The sections every probe must print; a missing one means the probe
/// did not run as written, and nothing is concluded from it.
const SECTIONS: [&str; 9] =
    ["links", "addresses", "routes-ipv4", "routes-ipv6", "rules-ipv4", "rules-ipv6", "nftables", "iptables-legacy", "sysctls"];

/// One namespace's state, section by section, as [`PROBE_SCRIPT`] prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsSnapshot {
    sections: BTreeMap<String, String>,
}

impl NetnsSnapshot {
    /// The state of `netns`.
    pub fn of(netns: &Netns) -> Result<Self, NetworkError> {
        Self::parse(&run_in(Some(netns), "sh", &["-c", PROBE_SCRIPT], None)?)
    }

    /// The state of a namespace made just now, loopback up (as runc and
    /// the receiver make them). It lives only as long as the probe.
    pub fn of_new_namespace() -> Result<Self, NetworkError> {
        let script = format!("ip link set lo up || exit 1\n{PROBE_SCRIPT}");
        Self::parse(&run_in(None, "unshare", &["--net", "--", "sh", "-c", &script], None)?)
    }

    fn parse(text: &str) -> Result<Self, NetworkError> {
        let mut sections = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("@@") {
                if let Some((n, body)) = current.take() {
                    sections.insert(n, body);
                }
                current = Some((name.to_string(), String::new()));
            } else if let Some((_, body)) = current.as_mut() {
                body.push_str(line);
                body.push('\n');
            }
        }
        if let Some((n, body)) = current {
            sections.insert(n, body);
        }
        if let Some(missing) = SECTIONS.iter().find(|s| !sections.contains_key(**s)) {
            return Err(NetworkError::Parse { command: "network namespace probe".into(), reason: format!("no `{missing}` section") });
        }
        Ok(Self { sections })
    }

    /// Names of the sections in which `self` and `other` differ.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        SECTIONS.iter().filter(|s| self.sections.get(**s) != other.sections.get(**s)).map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_output(sysctl_value: &str) -> String {
        let mut text = String::new();
        for s in SECTIONS {
            text.push_str(&format!("@@{s}\n"));
            if s == "sysctls" {
                text.push_str(&format!("/proc/sys/net/ipv4/conf/lo/forwarding:{sysctl_value}\n"));
            }
        }
        text
    }

    #[test]
    fn sections_that_differ_are_named() {
        let a = NetnsSnapshot::parse(&probe_output("0")).unwrap();
        let b = NetnsSnapshot::parse(&probe_output("1")).unwrap();
        assert!(a.differences(&a.clone()).is_empty());
        assert_eq!(a.differences(&b), vec!["sysctls".to_string()]);
    }

    #[test]
    fn a_probe_missing_a_section_is_not_trusted() {
        let text = probe_output("0").replace("@@nftables\n", "");
        assert!(NetnsSnapshot::parse(&text).is_err());
    }
}
