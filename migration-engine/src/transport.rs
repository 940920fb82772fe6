//! Where a migration goes: `tcp://HOST:PORT`.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::MigrationError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Tcp { host: String, port: u16 },
    /// Through the system `ssh`, which runs `ctmigrate receive --stdio`
    /// there.
    Ssh { user: Option<String>, host: String, port: Option<u16> },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Destination::Ssh { user, host, port } => {
                write!(f, "ssh://")?;
                if let Some(u) = user {
                    write!(f, "{u}@")?;
                }
                write!(f, "{host}")?;
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                Ok(())
            }
        }
    }
}

/// Starts `ssh` to run `remote_command` on the destination, its stdio the
/// migration stream. BatchMode: ssh fails rather than prompt, so a script
/// never hangs on a password or a new host key; the user's ssh config,
/// agent, known_hosts and ProxyJump apply as usual.
pub fn spawn_ssh(
    dest: &Destination,
    options: &[String],
    remote_command: &str,
    stderr: std::fs::File,
) -> Result<std::process::Child, MigrationError> {
    let Destination::Ssh { user, host, port } = dest else {
        return Err(MigrationError::Usage("not an ssh:// destination".into()));
    };
    let mut cmd = std::process::Command::new(std::env::var_os("CTMIGRATE_SSH").unwrap_or_else(|| "ssh".into()));
    cmd.args(["-o", "BatchMode=yes", "-o", "ServerAliveInterval=10", "-T"]);
    if let Some(p) = port {
        cmd.arg("-p").arg(p.to_string());
    }
    for o in options {
        cmd.arg("-o").arg(o);
    }
    let target = match user {
        Some(u) => format!("{u}@{host}"),
        None => host.clone(),
    };
    cmd.arg("--").arg(target).arg(remote_command);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(stderr);
    cmd.spawn().map_err(|e| MigrationError::Unreachable { addr: dest.to_string(), reason: format!("cannot run ssh: {e}") })
}

impl std::str::FromStr for Destination {
    type Err = MigrationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = |why: &str| {
            MigrationError::Usage(format!(
                "invalid destination `{s}`: {why}; expected tcp://HOST:PORT or ssh://[USER@]HOST[:PORT]"
            ))
        };
        if let Some(rest) = s.strip_prefix("ssh://") {
            let (user, hostport) = match rest.split_once('@') {
                Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
                Some(_) => return Err(usage("empty user")),
                None => (None, rest),
            };
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                    let port: u16 = p.parse().map_err(|_| usage("port is not a number from 1 to 65535"))?;
                    (h.trim_start_matches('[').trim_end_matches(']'), Some(port))
                }
                _ => (hostport, None),
            };
            if host.is_empty() || host.starts_with('-') || host.contains(char::is_whitespace) {
                return Err(usage("bad host"));
            }
            if user.as_deref().is_some_and(|u| u.starts_with('-') || u.contains(char::is_whitespace)) {
                return Err(usage("bad user"));
            }
            return Ok(Destination::Ssh { user, host: host.to_string(), port });
        }
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

/// Connects within `timeout` in all, trying each resolved address.
pub fn connect(dest: &Destination, timeout: Duration) -> Result<TcpStream, MigrationError> {
    let deadline = std::time::Instant::now() + timeout;
    let Destination::Tcp { host, port } = dest else {
        return Err(MigrationError::Usage("not a tcp:// destination".into()));
    };
    let unreachable = |reason: String| MigrationError::Unreachable { addr: dest.to_string(), reason };
    let addrs: Vec<SocketAddr> = (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = String::from("no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            last = format!("no connection within --timeout {} s", timeout.as_secs());
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

/// A connection or handshake that failed for want of the receiver: one
/// line naming the destination and what to do (never `os error 11`).
pub fn no_answer(e: MigrationError, to: &Destination, timeout: Duration, expired: bool) -> MigrationError {
    use std::io::ErrorKind as K;
    let kind = match &e {
        // The watchdog shut the socket down: the reads saw an end.
        _ if expired => Some(K::TimedOut),
        MigrationError::Io { source, .. } | MigrationError::Protocol(migration_protocol::ProtocolError::Io(source)) => Some(source.kind()),
        MigrationError::Protocol(migration_protocol::ProtocolError::Closed | migration_protocol::ProtocolError::Truncated(_)) => Some(K::UnexpectedEof),
        _ => None,
    };
    match kind {
        Some(K::WouldBlock | K::TimedOut) => MigrationError::Preflight(format!(
            "the receiver at {to} accepted the connection but did not answer within --timeout {} s (busy or stalled): \
             try again later, or check `ctmigrate receive` there",
            timeout.as_secs()
        )),
        Some(K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe) => MigrationError::Preflight(format!(
            "the receiver at {to} closed the connection during the handshake: it is busy (over its connection bounds) \
             or stopping; try again later, and see its events or audit log for why"
        )),
        _ => e,
    }
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
        assert_eq!(
            "ssh://root@db1:2222".parse::<Destination>().unwrap(),
            Destination::Ssh { user: Some("root".into()), host: "db1".into(), port: Some(2222) }
        );
        assert_eq!(
            "ssh://db1".parse::<Destination>().unwrap(),
            Destination::Ssh { user: None, host: "db1".into(), port: None }
        );
        for bad in ["10.0.0.2:7000", "tcp://host", "tcp://:1", "tcp://h:0", "tcp://h:99999", "udp://h:1", "ssh://-oProxyCommand=x", "ssh://@h", "ssh://h:x"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad} accepted");
        }
    }
}

/// A byte rate shared by every connection that holds it (`--bwlimit`):
/// one migration's, or all of an evacuation's, which then share the link
/// rather than each taking the whole rate.
#[derive(Debug)]
pub struct Rate {
    bytes_per_s: u64,
    /// When the first byte went, and how many went since, all writers
    /// together.
    ledger: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Rate {
    pub fn new(bytes_per_s: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { bytes_per_s: bytes_per_s.max(1), ledger: std::sync::Mutex::new((None, 0)) })
    }

    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s
    }

    /// Counts `n` bytes written and says how long the writer must wait
    /// for the rate to hold.
    fn account(&self, n: u64) -> Option<Duration> {
        let mut ledger = self.ledger.lock().unwrap();
        let started = *ledger.0.get_or_insert_with(std::time::Instant::now);
        // A rate idle for over a second builds up no credit: the burst
        // after the pause keeps to the rate too.
        let due = Duration::from_secs_f64(ledger.1 as f64 / self.bytes_per_s as f64);
        if started.elapsed() > due + Duration::from_secs(1) {
            *ledger = (Some(std::time::Instant::now()), 0);
        }
        ledger.1 += n;
        let started = ledger.0.expect("set above");
        let due = Duration::from_secs_f64(ledger.1 as f64 / self.bytes_per_s as f64);
        due.checked_sub(started.elapsed())
    }
}

/// A writer that keeps to a [`Rate`]: after each write it sleeps as long as
/// the rate's writers together are ahead of it.
pub struct Throttle<W> {
    inner: W,
    rate: Option<std::sync::Arc<Rate>>,
}

impl<W> Throttle<W> {
    pub fn new(inner: W, rate: Option<std::sync::Arc<Rate>>) -> Self {
        Self { inner, rate }
    }
}

impl<W: std::io::Write> std::io::Write for Throttle<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(rate) = &self.rate else { return self.inner.write(buf) };
        // At most a tenth of a second's worth per write keeps the pace smooth.
        let max = ((rate.bytes_per_s / 10).max(4096) as usize).min(buf.len());
        let n = self.inner.write(&buf[..max])?;
        if let Some(ahead) = rate.account(n as u64) {
            std::thread::sleep(ahead);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `--bwlimit`: bytes per second, with an optional k, M or G suffix (powers
/// of 1000), e.g. `50M`.
pub fn parse_rate(s: &str) -> Result<u64, MigrationError> {
    let bad = || MigrationError::Usage(format!("invalid rate `{s}`: expected bytes per second such as 500k, 50M or 1G"));
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000),
        Some('m' | 'M') => (&s[..s.len() - 1], 1_000_000),
        Some('g' | 'G') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(((v * mult as f64) as u64).max(1))
}

#[cfg(test)]
mod throttle_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("50M").unwrap(), 50_000_000);
        assert_eq!(parse_rate("1.5k").unwrap(), 1500);
        assert_eq!(parse_rate("123").unwrap(), 123);
        for bad in ["", "M", "-5M", "fast", "0"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn throttle_keeps_to_its_rate() {
        // 200 kB at 1 MB/s takes about 0.2 s; never less.
        let mut t = Throttle::new(Vec::new(), Some(Rate::new(1_000_000)));
        let start = std::time::Instant::now();
        t.write_all(&vec![0u8; 200_000]).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(190), "{:?}", start.elapsed());
        assert_eq!(t.inner.len(), 200_000);
    }

    #[test]
    fn writers_of_one_rate_share_it() {
        // Two writers of 100 kB each on one 1 MB/s rate take about 0.2 s
        // together (each alone would take 0.1 s); never less.
        let rate = Rate::new(1_000_000);
        let start = std::time::Instant::now();
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let rate = rate.clone();
                std::thread::spawn(move || {
                    let mut t = Throttle::new(Vec::new(), Some(rate));
                    t.write_all(&vec![0u8; 100_000]).unwrap();
                    t.inner.len()
                })
            })
            .collect();
        let written: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(written, 200_000);
        assert!(start.elapsed() >= Duration::from_millis(190), "{:?}", start.elapsed());
    }
}

#[cfg(test)]
mod no_answer_tests {
    use super::*;
    use migration_protocol::ProtocolError;

    #[test]
    fn a_receiver_that_is_busy_or_silent_is_one_clear_line() {
        let to: Destination = "tcp://10.0.0.2:7000".parse().unwrap();
        let t = Duration::from_secs(3);
        let eagain = std::io::Error::from_raw_os_error(11);
        for (e, expired, says) in [
            (MigrationError::Protocol(ProtocolError::Io(eagain)), false, "did not answer within --timeout 3 s"),
            (MigrationError::Protocol(ProtocolError::Closed), true, "did not answer within --timeout 3 s"),
            (MigrationError::Protocol(ProtocolError::Closed), false, "closed the connection during the handshake"),
            (MigrationError::io("TLS handshake failed")(std::io::ErrorKind::ConnectionReset.into()), false, "busy"),
        ] {
            let msg = no_answer(e, &to, t, expired).to_string();
            assert!(msg.contains(says) && msg.contains("tcp://10.0.0.2:7000") && !msg.contains("os error"), "{msg}");
            assert!(!msg.contains('\n'));
        }
        let other = no_answer(MigrationError::Refused("no".into()), &to, t, false);
        assert!(matches!(other, MigrationError::Refused(_)), "other errors pass through");
    }
}
