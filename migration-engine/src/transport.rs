//! Where a migration goes: `tcp://HOST:PORT`.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::MigrationError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Tcp { host: String, port: u16 },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

impl std::str::FromStr for Destination {
    type Err = MigrationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = |why: &str| {
            MigrationError::Usage(format!("invalid destination `{s}`: {why}; expected tcp://HOST:PORT"))
        };
        let rest = s.strip_prefix("tcp://").ok_or_else(|| usage("unknown scheme"))?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| usage("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(usage("no host"));
        }
        let port: u16 = port.parse().map_err(|_| usage("port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(usage("port 0"));
        }
        Ok(Destination::Tcp { host: host.to_string(), port })
    }
}

/// Connects with a deadline, trying each resolved address.
pub fn connect(dest: &Destination, timeout: Duration) -> Result<TcpStream, MigrationError> {
    let Destination::Tcp { host, port } = dest;
    let unreachable = |reason: String| MigrationError::Unreachable { addr: dest.to_string(), reason };
    let addrs: Vec<SocketAddr> = (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_urls() {
        assert_eq!(
            "tcp://10.0.0.2:7000".parse::<Destination>().unwrap(),
            Destination::Tcp { host: "10.0.0.2".into(), port: 7000 }
        );
        assert_eq!(
            "tcp://[::1]:7000".parse::<Destination>().unwrap(),
            Destination::Tcp { host: "::1".into(), port: 7000 }
        );
        for bad in ["10.0.0.2:7000", "tcp://host", "tcp://:1", "tcp://h:0", "tcp://h:99999", "udp://h:1"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad} accepted");
        }
    }
}
