//! Prometheus metrics (`--metrics ADDR` on `receive` and `send`): one
//! registry per process, shared by every migration it serves, fed from the
//! events the migrations emit (a [`Reporter`](crate::Reporter) given the
//! registry with [`Reporter::with_metrics`](crate::Reporter::with_metrics)),
//! and served as text over plain HTTP (`GET /metrics`) by [`serve`].
//!
//! The series (docs/operations.md, "Metrics", says what each means):
//!
//! | series | kind | labels |
//! |---|---|---|
//! | `ctmigrate_migrations_total` | counter | `role`, `result` |
//! | `ctmigrate_frozen_seconds` | histogram | `role` |
//! | `ctmigrate_migration_seconds` | histogram | `role` |
//! | `ctmigrate_wire_bytes_total` | counter | `role` |
//! | `ctmigrate_raw_bytes_total` | counter | `role` |
//! | `ctmigrate_migrations_in_flight` | gauge | `role` |
//! | `ctmigrate_migrations_in_doubt` | gauge | `role` |
//! | `ctmigrate_precopy_rounds_total` | counter | `role` |
//! | `ctmigrate_rollbacks_total` | counter | `role` |

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read as _, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::events::{Event, Phase, ResultEvent};
use crate::Outcome;

/// The content type of a scrape: the OpenMetrics text format, which
/// Prometheus negotiates and parses (its classic text format's successor).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which side of a migration this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        }
    }

    /// The role an event names (`validate`'s own results name none).
    fn parse(role: &str) -> Option<Self> {
        match role {
            "sender" => Some(Role::Sender),
            "receiver" => Some(Role::Receiver),
            _ => None,
        }
    }
}

/// How a migration ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationResult {
    /// Moved: the destination's copy runs, the source is gone.
    Ok,
    /// Failed after the source froze; it was thawed and runs (exit 4).
    RolledBack,
    /// The Commit got no answer in time: the source stays frozen until
    /// `ctmigrate resolve` (exit 6).
    InDoubt,
    /// Refused before anything was touched (exit 3): preflight, the
    /// receiver's limits, a bad manifest, a failed handshake.
    Refused,
    /// Anything else: the source could not be resumed, or the committed
    /// copy could not be let run (exit 5).
    Failed,
}

impl MigrationResult {
    pub const ALL: [MigrationResult; 5] =
        [MigrationResult::Ok, MigrationResult::RolledBack, MigrationResult::InDoubt, MigrationResult::Refused, MigrationResult::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationResult::Ok => "ok",
            MigrationResult::RolledBack => "rolled_back",
            MigrationResult::InDoubt => "in_doubt",
            MigrationResult::Refused => "refused",
            MigrationResult::Failed => "failed",
        }
    }

    /// From a result event: its `ok`, else its exit code (the
    /// [`Outcome`]'s).
    pub fn of(result: &ResultEvent) -> Self {
        if result.ok {
            return MigrationResult::Ok;
        }
        match result.exit_code {
            Some(c) if c == Outcome::NothingTouched.exit_code() => MigrationResult::Refused,
            Some(c) if c == Outcome::SourceResumed.exit_code() => MigrationResult::RolledBack,
            Some(c) if c == Outcome::Uncertain.exit_code() => MigrationResult::InDoubt,
            _ => MigrationResult::Failed,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    role: &'static str,
    result: &'static str,
}

/// Bucket bounds of the frozen-time histogram, in seconds.
pub const FROZEN_BUCKETS: [f64; 12] = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
/// Bucket bounds of the total-time histogram, in seconds.
pub const TOTAL_BUCKETS: [f64; 11] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

/// A migration this process serves now, on the thread that emits its
/// events (a receiver serves each connection on a thread of its own; a
/// sender runs its migration on one thread).
#[derive(Debug, Clone, Copy)]
struct Flight {
    role: Role,
    rolled_back: bool,
}

/// The registry and its series. Shared (`Arc`) by every migration of the
/// process and by the HTTP responder.
pub struct Metrics {
    registry: Registry,
    finished: Family<ResultLabels, Counter>,
    frozen: Family<RoleLabels, Histogram, fn() -> Histogram>,
    total: Family<RoleLabels, Histogram, fn() -> Histogram>,
    wire_bytes: Family<RoleLabels, Counter>,
    raw_bytes: Family<RoleLabels, Counter>,
    in_flight: Family<RoleLabels, Gauge>,
    in_doubt: Family<RoleLabels, Gauge>,
    rounds: Family<RoleLabels, Counter>,
    rollbacks: Family<RoleLabels, Counter>,
    flights: Mutex<HashMap<ThreadId, Flight>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn frozen_histogram() -> Histogram {
    Histogram::new(FROZEN_BUCKETS)
}

fn total_histogram() -> Histogram {
    Histogram::new(TOTAL_BUCKETS)
}

impl Metrics {
    /// A registry for a process of `role`: its series start at zero (every
    /// `result` of the finished counter too), so a first scrape shows them
    /// all and `rate()`/`increase()` see the first migration.
    pub fn new(role: Role) -> Self {
        let mut registry = Registry::with_prefix("ctmigrate");
        let finished = Family::<ResultLabels, Counter>::default();
        let frozen = Family::<RoleLabels, Histogram, fn() -> Histogram>::new_with_constructor(frozen_histogram as fn() -> Histogram);
        let total = Family::<RoleLabels, Histogram, fn() -> Histogram>::new_with_constructor(total_histogram as fn() -> Histogram);
        let (wire_bytes, raw_bytes) = (Family::<RoleLabels, Counter>::default(), Family::<RoleLabels, Counter>::default());
        let (in_flight, in_doubt) = (Family::<RoleLabels, Gauge>::default(), Family::<RoleLabels, Gauge>::default());
        let (rounds, rollbacks) = (Family::<RoleLabels, Counter>::default(), Family::<RoleLabels, Counter>::default());
        registry.register(
            "migrations",
            "Migrations finished, by role (sender, receiver) and result (ok, rolled_back, in_doubt, refused, failed)",
            finished.clone(),
        );
        registry.register("frozen_seconds", "Time the source was frozen, per migration that froze it", frozen.clone());
        registry.register("migration_seconds", "Time from a migration's start to its result, per migration", total.clone());
        registry.register("wire_bytes", "Bytes put on (sender) or read from (receiver) the wire, framing and compression included", wire_bytes.clone());
        registry.register("raw_bytes", "Payload bytes before compression (sender) or after decompression (receiver)", raw_bytes.clone());
        registry.register("migrations_in_flight", "Migrations started and not finished", in_flight.clone());
        registry.register(
            "migrations_in_doubt",
            "Migrations whose Commit went unacknowledged and that are not settled (the source frozen meanwhile)",
            in_doubt.clone(),
        );
        registry.register("precopy_rounds", "Pre-copy (pre-dump) rounds run while containers kept running", rounds.clone());
        registry.register("rollbacks", "Migrations rolled back after the source froze (the source thawed, the destination's copy removed)", rollbacks.clone());
        let labels = RoleLabels { role: role.as_str() };
        for r in MigrationResult::ALL {
            let _ = finished.get_or_create(&ResultLabels { role: role.as_str(), result: r.as_str() });
        }
        for f in [&wire_bytes, &raw_bytes, &rounds, &rollbacks] {
            let _ = f.get_or_create(&labels);
        }
        for f in [&in_flight, &in_doubt] {
            let _ = f.get_or_create(&labels);
        }
        let _ = frozen.get_or_create(&labels);
        let _ = total.get_or_create(&labels);
        Metrics {
            registry,
            finished,
            frozen,
            total,
            wire_bytes,
            raw_bytes,
            in_flight,
            in_doubt,
            rounds,
            rollbacks,
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// The whole exposition, `# EOF` included.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).map_err(|_| MetricsError::Encode)?;
        Ok(text)
    }

    /// Records what an event says. A migration is in flight from its
    /// `start` to its `result`, both emitted on the thread that runs it.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Start { role, .. } => {
                let Some(role) = Role::parse(role) else { return };
                let fresh = self.flights().insert(std::thread::current().id(), Flight { role, rolled_back: false }).is_none();
                if fresh {
                    self.in_flight.get_or_create(&RoleLabels { role: role.as_str() }).inc();
                }
            }
            Event::Round(_) => {
                if let Some(role) = self.current_role() {
                    self.precopy_round(role);
                }
            }
            Event::Phase { phase: Phase::Rollback, .. } => self.rolled_back(),
            Event::Result(r) => self.finished(r),
            _ => {}
        }
    }

    /// A pre-copy round finished (the sender's `round` event; a round of
    /// images received and verified, on the receiver, which emits none).
    pub fn precopy_round(&self, role: Role) {
        self.rounds.get_or_create(&RoleLabels { role: role.as_str() }).inc();
    }

    /// A migration's Commit went unacknowledged: asking the destination
    /// what it did begins (the source frozen meanwhile).
    pub fn in_doubt_began(&self, role: Role) {
        self.in_doubt.get_or_create(&RoleLabels { role: role.as_str() }).inc();
    }

    /// That migration is settled (either way), or its process gives up
    /// asking and leaves it to `ctmigrate resolve` ([`Self::in_doubt_began`]
    /// stays counted then, until the process exits).
    pub fn in_doubt_settled(&self, role: Role) {
        self.in_doubt.get_or_create(&RoleLabels { role: role.as_str() }).dec();
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<ThreadId, Flight>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current_role(&self) -> Option<Role> {
        self.flights().get(&std::thread::current().id()).map(|f| f.role)
    }

    /// Counted once per migration, however many rollback phases it went
    /// through.
    fn rolled_back(&self) {
        let role = {
            let mut flights = self.flights();
            match flights.get_mut(&std::thread::current().id()) {
                Some(f) if !f.rolled_back => {
                    f.rolled_back = true;
                    f.role
                }
                _ => return,
            }
        };
        self.rollbacks.get_or_create(&RoleLabels { role: role.as_str() }).inc();
    }

    fn finished(&self, r: &ResultEvent) {
        let Some(role) = Role::parse(r.role) else { return };
        let labels = RoleLabels { role: role.as_str() };
        let flight = self.flights().remove(&std::thread::current().id());
        let result = MigrationResult::of(r);
        self.finished.get_or_create(&ResultLabels { role: role.as_str(), result: result.as_str() }).inc();
        self.wire_bytes.get_or_create(&labels).inc_by(r.bytes_sent);
        self.raw_bytes.get_or_create(&labels).inc_by(r.bytes_raw);
        if let Some(frozen) = r.frozen_ms {
            self.frozen.get_or_create(&labels).observe(frozen as f64 / 1000.0);
        }
        let Some(flight) = flight else {
            // Refused before it started (a handshake, a limit): counted,
            // but neither timed nor in flight.
            return;
        };
        self.in_flight.get_or_create(&labels).dec();
        self.total.get_or_create(&labels).observe(r.total_ms as f64 / 1000.0);
        // The receiver has no rollback phase of its own: its staged copy
        // removed after the source froze is its rollback.
        if !flight.rolled_back && role == Role::Receiver && result == MigrationResult::RolledBack {
            self.rollbacks.get_or_create(&labels).inc();
        }
    }
}

/// What can go wrong with metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}; pick another address or port")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not an address to serve metrics on: give ADDR:PORT, e.g. 127.0.0.1:9464")]
    BadAddress(String),
    #[error("encoding the metrics failed")]
    Encode,
    #[error("starting the metrics responder: {0}")]
    Spawn(#[source] std::io::Error),
}

/// How long one scrape's connection may take to send its request, and to
/// take the answer.
const SCRAPE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP responder: runs until dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen, with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Listens on `addr` (ADDR:PORT) and answers `GET /metrics` with the
/// registry's exposition, one connection at a time on a thread of its own;
/// anything else gets 404 (another path) or 405 (another method).
pub fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<MetricsServer, MetricsError> {
    let parsed: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|_| MetricsError::BadAddress(addr.to_string()))?
        .collect();
    if parsed.is_empty() {
        return Err(MetricsError::BadAddress(addr.to_string()));
    }
    let listener = TcpListener::bind(&parsed[..]).map_err(|source| MetricsError::Bind { addr: addr.to_string(), source })?;
    let local = listener.local_addr().map_err(|source| MetricsError::Bind { addr: addr.to_string(), source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    // A client that misbehaves costs this scrape, nothing else.
                    let _ = answer(conn, &metrics);
                }
            }
        })
        .map_err(MetricsError::Spawn)?;
    Ok(MetricsServer { addr: local, stop, thread: Some(thread) })
}

/// Reads one request (its line and headers) and answers it; the
/// connection closes after.
fn answer(conn: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    conn.set_read_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    conn.set_write_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?).take(16 * 1024);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers are read and ignored (up to the blank line).
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match metrics.render() {
            Ok(text) => ("200 OK", CONTENT_TYPE, text),
            Err(e) => ("500 Internal Server Error", "text/plain; charset=utf-8", format!("{e}\n")),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain; charset=utf-8", "metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
    };
    let mut out = std::io::BufWriter::new(conn);
    write!(out, "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    if method != "HEAD" {
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}

pub mod exposition;

#[cfg(test)]
mod tests;
