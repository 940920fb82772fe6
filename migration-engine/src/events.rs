//! What a migration tells its user: newline-delimited JSON events with
//! `--json`, a progress display on a terminal, plain lines otherwise.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// The stages of a migration, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Preflight,
    Connect,
    Precopy,
    RootfsSync,
    Freeze,
    RootfsDelta,
    Dump,
    Transfer,
    Restore,
    Commit,
    Cleanup,
    Rollback,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Connect => "connect",
            Phase::Precopy => "pre-copy (running)",
            Phase::RootfsSync => "rootfs sync (running)",
            Phase::Freeze => "freeze",
            Phase::RootfsDelta => "rootfs delta (frozen)",
            Phase::Dump => "dump",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Cleanup => "cleanup",
            Phase::Rollback => "rollback",
        }
    }
}

/// How post-copy's memory followed the running copy (in the result).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyReport {
    /// The lease the destination's copy ran on.
    pub lease_ms: u64,
    /// Page faults served on demand (pages the running copy waited for).
    pub faults: u64,
    /// Pages that came after the copy was restored, and of those the ones
    /// fetched in the background.
    pub pages: u64,
    pub background_pages: u64,
    /// From the copy being let run to its last page.
    pub all_pages_after_run_ms: u64,
}

/// The final event of a migration, on both sides.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResultEvent {
    pub ok: bool,
    pub role: &'static str,
    /// Names the migration in both hosts' journals (`ctmigrate status`,
    /// `ctmigrate resolve`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    pub container: String,
    pub dest_id: String,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_reason: Option<String>,
    /// Who moves the container's network namespace (ctmigrate or CRIU)
    /// and why; absent when the container uses the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Source frozen until the destination reported it running (sender);
    /// from the first record sent frozen to the copy running (receiver).
    pub frozen_ms: Option<u64>,
    /// Post-copy: how the memory followed the running copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
    /// Post-copy fell back after the destination's copy had run this
    /// long: what it did meanwhile is lost (the source resumed from the
    /// moment it froze).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_after_run_ms: Option<u64>,
    pub total_ms: u64,
    /// Bytes put on the wire (headers, compression included).
    pub bytes_sent: u64,
    /// Payload bytes before compression.
    pub bytes_raw: u64,
    /// Sum of CRIU's image files, all rounds.
    pub image_bytes: u64,
    /// Pre-dump rounds, in order (empty for stop-copy).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<crate::precopy::RoundReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<crate::precopy::StopReason>,
    /// tmpfs mounts empty at the freeze, which the destination mounted anew
    /// instead of CRIU archiving them (sender).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tmpfs_made_anew: Vec<String>,
    /// Page bytes of the final (frozen) dump.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_bytes: Option<u64>,
    /// Of `final_bytes`, those relayed from CRIU's page-server socket
    /// without being staged on the source host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_relayed_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `running`, `migrated`, `untouched`, `not-resumed`, `uncertain`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Where the frozen time went (sender).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_phases: Option<FrozenPhases>,
    /// The destination proved, before restoring, that its rootfs equals
    /// the source's frozen rootfs (both sides report it).
    pub rootfs_verified: bool,
    /// The rootfs copy: passes, the tree digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsReport>,
    /// CPU and memory this process used, measured as the result is sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResourceUsage>,
    /// `validate`: what it migrated (`counter`, `redis`, `nginx`,
    /// `postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// `validate --workload`: answers its client checked (Redis rounds,
    /// HTTP downloads, committed pgbench transactions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answers_checked: Option<u64>,
    /// `validate --workload`: the longest time the client waited between
    /// two answers, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_longest_gap_ms: Option<u64>,
    /// Receiver, `--tcp-established`: established TCP connections whose
    /// peers were nudged to retransmit at once after the copy ran
    /// (container_network::nudge); absent when nudging failed (a warning
    /// says why) or was not tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_nudged: Option<u64>,
}

/// What the rootfs copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RootfsReport {
    /// SHA-256 of the frozen tree (see docs/protocol.md), hex.
    pub digest: String,
    /// Entries in the frozen tree.
    pub entries: u64,
    /// Sender: entries and file bytes of the initial pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_file_bytes: Option<u64>,
    /// Sender: entries sent and deleted while frozen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_deleted: Option<u64>,
    /// Sender: how the frozen pass found changes (`inotify`, or why it
    /// compared every entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_tracking: Option<String>,
    /// Receiver: how long the verification took, and how much of that the
    /// restore waited for (it runs while the images arrive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_wait_ms: Option<u64>,
}

/// The frozen window, phase by phase, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FrozenPhases {
    /// Rootfs changes since the initial sync.
    pub rootfs_delta_ms: u64,
    /// CRIU's final dump with its pages streamed, until every image is sent.
    pub dump_and_transfer_ms: u64,
    /// Of that, how long CRIU's dump ran; the rest is the transfer's tail.
    pub criu_dump_ms: u64,
    /// From the last image sent to Ready (restored, tasks stopped).
    pub restore_wait_ms: u64,
    /// The destination's own measure of `runc restore`.
    pub restore_ms: u64,
    /// The fenced commit: from Ready to the CommitAck (commit-sent
    /// journalled, Commit, the destination's journal, its network up and
    /// its tasks continued).
    pub commit_ms: u64,
}

/// CPU time and peak resident memory of this process, and of the child
/// processes it has waited for (CRIU, runc, ssh).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResourceUsage {
    pub cpu_ms: u64,
    pub peak_rss_kib: u64,
    pub children_cpu_ms: u64,
    pub children_peak_rss_kib: u64,
}

impl ResourceUsage {
    pub fn measure() -> Self {
        use nix::sys::resource::{getrusage, UsageWho};
        let cpu = |u: &nix::sys::resource::Usage| {
            let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1000 + t.tv_usec() as u64 / 1000;
            ms(u.user_time()) + ms(u.system_time())
        };
        let (me, children) = (getrusage(UsageWho::RUSAGE_SELF).ok(), getrusage(UsageWho::RUSAGE_CHILDREN).ok());
        ResourceUsage {
            cpu_ms: me.as_ref().map(cpu).unwrap_or(0),
            peak_rss_kib: me.as_ref().map(|u| u.max_rss() as u64).unwrap_or(0),
            children_cpu_ms: children.as_ref().map(cpu).unwrap_or(0),
            children_peak_rss_kib: children.as_ref().map(|u| u.max_rss() as u64).unwrap_or(0),
        }
    }
}

// One event is built, serialized once and dropped: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Start {
        role: &'static str,
        container: String,
        dest_id: String,
        peer: String,
        mode: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode_reason: Option<String>,
    },
    Listening {
        addr: String,
    },
    Accepted {
        peer: String,
    },
    /// Receiver: a connection closed as soon as it was accepted, being over
    /// one of the handshake's bounds.
    Rejected {
        peer: String,
        reason: String,
    },
    Phase {
        phase: Phase,
        elapsed_ms: u64,
    },
    Progress {
        phase: Phase,
        bytes: u64,
        mb_per_s: f64,
        /// What the phase is expected to move (the rootfs' size, the
        /// container's resident memory), where known; an estimate, so
        /// `bytes` may pass it.
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        percent: Option<f64>,
        /// Seconds left at the rate so far.
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_s: Option<u64>,
    },
    Warning {
        message: String,
    },
    /// What `validate` is doing.
    Note {
        message: String,
    },
    /// A pre-dump round finished.
    Round(crate::precopy::RoundReport),
    /// Destination: a verified pre-dump round's pages were copied into
    /// round 1's (`folded_bytes`), so the restore reads one image, not a
    /// chain; or the round stays a layer of its own (`kept_because`).
    RoundFold {
        round: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        folded_bytes: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        kept_because: Option<String>,
    },
    /// Pre-copy ends; the final dump follows.
    PrecopyStop {
        rounds: u32,
        reason: crate::precopy::StopReason,
        detail: &'static str,
    },
    Result(ResultEvent),
    /// `send ID...` and `evacuate`: what became of each container.
    Summary(crate::evacuate::Summary),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportMode {
    Json,
    Progress,
    Plain,
    Quiet,
}

/// Sends events to the chosen output. Shared between threads.
pub struct Reporter {
    mode: ReportMode,
    start: Instant,
    bar: Mutex<Option<ProgressBar>>,
    last_progress: Mutex<Instant>,
    /// Where the JSON events also go, whatever the mode
    /// ([`Reporter::with_events_file`]).
    events_file: Option<Arc<Mutex<std::fs::File>>>,
    /// Where every event is also counted (`--metrics`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// One migration of several ([`Reporter::for_container`]): the
    /// container its events are about.
    container: Option<String>,
    /// The terminal's lines, one a container, when several migrations run.
    lines: OnceLock<MultiProgress>,
}

impl Reporter {
    /// `--json` → JSON on stdout; else a progress bar if stderr is a
    /// terminal, plain lines if it is not.
    pub fn new(json: bool) -> Self {
        let mode = if json {
            ReportMode::Json
        } else if std::io::stderr().is_terminal() {
            ReportMode::Progress
        } else {
            ReportMode::Plain
        };
        Self::with_mode(mode)
    }

    pub fn with_mode(mode: ReportMode) -> Self {
        Self {
            mode,
            start: Instant::now(),
            bar: Mutex::new(None),
            last_progress: Mutex::new(Instant::now() - Duration::from_secs(1)),
            events_file: None,
            metrics: None,
            container: None,
            lines: OnceLock::new(),
        }
    }

    /// The reporter of one migration of several run at once (`send ID...`,
    /// `evacuate`): its JSON events carry `container`, its plain lines
    /// start with it, its progress is one terminal line of its own; the
    /// output, events file and metrics are this reporter's.
    pub fn for_container(&self, container: &str) -> Reporter {
        let lines = OnceLock::new();
        if self.mode == ReportMode::Progress {
            let _ = lines.set(self.lines.get_or_init(MultiProgress::new).clone());
        }
        Reporter {
            mode: self.mode,
            start: self.start,
            bar: Mutex::new(None),
            last_progress: Mutex::new(Instant::now() - Duration::from_secs(1)),
            events_file: self.events_file.clone(),
            metrics: self.metrics.clone(),
            container: Some(container.to_string()),
            lines,
        }
    }

    /// Also appends every event, as one JSON line, to `file` (a service's
    /// events file, kept apart from its log lines on stderr). Progress
    /// events stay out of it.
    pub fn with_events_file(mut self, file: std::fs::File) -> Self {
        self.events_file = Some(Arc::new(Mutex::new(file)));
        self
    }

    /// Also records every event in `metrics` (the process's registry,
    /// which its `--metrics` responder serves).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The registry events are recorded in, if any.
    pub fn metrics(&self) -> Option<&crate::metrics::Metrics> {
        self.metrics.as_deref()
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn phase(&self, phase: Phase) {
        self.emit(Event::Phase { phase, elapsed_ms: self.elapsed_ms() });
    }

    /// Throttled to a few events a second.
    pub fn progress(&self, phase: Phase, bytes: u64, since: Instant) {
        self.progress_of(phase, bytes, None, since)
    }

    /// Progress towards `total` bytes, where the phase knows roughly what
    /// it will move: percent and time left follow.
    pub fn progress_of(&self, phase: Phase, bytes: u64, total: Option<u64>, since: Instant) {
        {
            let mut last = self.last_progress.lock().unwrap();
            if last.elapsed() < Duration::from_millis(250) {
                return;
            }
            *last = Instant::now();
        }
        self.emit(progress_event(phase, bytes, total, since.elapsed()));
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.emit(Event::Warning { message: message.into() });
    }

    pub fn note(&self, message: impl Into<String>) {
        self.emit(Event::Note { message: message.into() });
    }

    pub fn emit(&self, event: Event) {
        if let Some(metrics) = &self.metrics {
            metrics.observe(&event);
        }
        if let Some(file) = &self.events_file {
            if !matches!(event, Event::Progress { .. }) {
                let mut line = self.json_line(&event);
                line.push('\n');
                // One write per line: lines from several migrations never
                // interleave (the file is opened to append).
                let _ = file.lock().unwrap().write_all(line.as_bytes());
            }
        }
        match self.mode {
            ReportMode::Quiet => {}
            ReportMode::Json => {
                let line = self.json_line(&event);
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            ReportMode::Plain => {
                if let Some(line) = human_line(&event) {
                    eprintln!("ctmigrate: {}{line}", self.prefix());
                }
            }
            ReportMode::Progress if self.container.is_some() => self.draw_line(&event),
            ReportMode::Progress => self.draw(&event),
        }
    }

    /// `container: ` for one migration of several, else nothing.
    fn prefix(&self) -> String {
        self.container.as_deref().map(|c| format!("{c}: ")).unwrap_or_default()
    }

    /// The event as one JSON line; one migration of several says which
    /// container it is about.
    fn json_line(&self, event: &Event) -> String {
        let Some(container) = &self.container else {
            return serde_json::to_string(event).expect("events serialize");
        };
        let mut value = serde_json::to_value(event).expect("events serialize");
        if let Some(fields) = value.as_object_mut() {
            fields.entry("container").or_insert_with(|| container.clone().into());
        }
        value.to_string()
    }

    /// One migration of several on a terminal: a line of its own, showing
    /// the phase and its progress, and at the end its outcome.
    fn draw_line(&self, event: &Event) {
        let mut bar = self.bar.lock().unwrap();
        let line = bar.get_or_insert_with(|| {
            // The shared lines draw every container's bar on stderr, one
            // line each.
            let b = match self.lines.get() {
                Some(lines) => lines.add(ProgressBar::new(0)),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            b.set_style(spinner_style());
            b.set_prefix(self.container.clone().unwrap_or_default());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        match event {
            Event::Phase { phase, .. } => {
                line.set_style(spinner_style());
                line.set_message(phase.label());
                line.set_length(0);
                line.set_position(0);
                line.reset_eta();
            }
            Event::Progress { bytes, total, .. } => {
                if let Some(total) = total {
                    line.set_style(bar_style());
                    line.set_length((*total).max(*bytes));
                }
                line.set_position(*bytes);
            }
            Event::Result(r) => {
                let summary = human_line(event).unwrap_or_default();
                line.set_style(ProgressStyle::with_template("{prefix:<20} {msg}").expect("valid template"));
                line.finish_with_message(if r.ok { summary } else { format!("stays: {summary}") });
            }
            other => {
                if let Some(text) = human_line(other) {
                    line.println(format!("ctmigrate: {}{text}", self.prefix()));
                }
            }
        }
    }

    fn draw(&self, event: &Event) {
        let mut bar = self.bar.lock().unwrap();
        match event {
            Event::Phase { phase, .. } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                b.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:<24} {msg} {binary_bytes} ({binary_bytes_per_sec}) [{elapsed}]")
                        .expect("valid template"),
                );
                b.set_prefix(phase.label());
                b.enable_steady_tick(Duration::from_millis(120));
                *bar = Some(b);
            }
            Event::Progress { bytes, total, .. } => {
                if let Some(b) = bar.as_ref() {
                    if let Some(total) = total {
                        b.set_style(bar_style());
                        b.set_prefix("");
                        b.set_length((*total).max(*bytes));
                    }
                    b.set_position(*bytes);
                }
            }
            other => {
                if let Some(line) = human_line(other) {
                    match bar.as_ref() {
                        Some(b) => b.println(format!("ctmigrate: {line}")),
                        None => eprintln!("ctmigrate: {line}"),
                    }
                }
                if matches!(other, Event::Result(_)) {
                    if let Some(b) = bar.take() {
                        b.finish_and_clear();
                    }
                }
            }
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:<20} {msg:<22} {binary_bytes} ({binary_bytes_per_sec}) [{elapsed}]").expect("valid template")
}

/// Where the size is known: percent and time left.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix:<20} {msg:<22} [{bar:24}] {percent:>3}% {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

/// A progress event: the rate so far and, towards a known total, the
/// percent done and the seconds left at that rate.
fn progress_event(phase: Phase, bytes: u64, total: Option<u64>, elapsed: Duration) -> Event {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = bytes as f64 / secs;
    let mb_per_s = (rate / 1e6 * 10.0).round() / 10.0;
    let total = total.filter(|t| *t > 0);
    let percent = total.map(|t| ((bytes as f64 / t as f64 * 1000.0).round() / 10.0).min(100.0));
    let eta_s = total.filter(|_| rate > 0.0).map(|t| (t.saturating_sub(bytes) as f64 / rate).ceil() as u64);
    Event::Progress { phase, bytes, mb_per_s, total, percent, eta_s }
}

fn human_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::Start { role, container, dest_id, peer, mode, mode_reason } => {
            let reason = mode_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            match *role {
                "sender" => format!("migrating {container} to {peer} as {dest_id}, mode {mode}{reason}"),
                _ => format!("receiving {container} from {peer} as {dest_id}"),
            }
        }
        Event::Listening { addr } => format!("listening on {addr}"),
        Event::Accepted { peer } => format!("connection from {peer}"),
        Event::Rejected { peer, reason } => format!("connection from {peer} refused: {reason}"),
        Event::Phase { phase, elapsed_ms } => format!("{} (at {elapsed_ms} ms)", phase.label()),
        Event::Progress { phase, bytes, mb_per_s, total, percent, eta_s } => match (total, percent, eta_s) {
            (Some(total), Some(percent), Some(eta)) => format!(
                "{}: {:.1} of {:.1} MB ({percent}%) at {mb_per_s} MB/s, about {eta} s left",
                phase.label(),
                *bytes as f64 / 1e6,
                *total as f64 / 1e6
            ),
            _ => format!("{}: {:.1} MB at {mb_per_s} MB/s", phase.label(), *bytes as f64 / 1e6),
        },
        Event::Warning { message } => format!("warning: {message}"),
        Event::Note { message } => message.clone(),
        Event::Round(r) => format!(
            "round {}: {} pages ({:.1} MB) in {} ms, {} MB/s{}",
            r.round,
            r.pages,
            r.bytes as f64 / 1e6,
            r.duration_ms,
            r.mb_per_s,
            r.estimated_downtime_ms.map(|e| format!(", estimated frozen time {e} ms")).unwrap_or_default()
        ),
        Event::RoundFold { round, folded_bytes: Some(bytes), .. } => {
            format!("round {round} folded into round 1 ({:.1} MB)", *bytes as f64 / 1e6)
        }
        Event::RoundFold { round, kept_because, .. } => {
            format!("round {round} kept as its own image layer: {}", kept_because.as_deref().unwrap_or("-"))
        }
        Event::PrecopyStop { rounds, detail, .. } => format!("pre-copy stops after {rounds} rounds: {detail}"),
        // Printed whole by the command, on standard output.
        Event::Summary(_) => return None,
        // validate's failure is the one line its caller prints.
        Event::Result(r) if r.role == "validate" && !r.ok => return None,
        Event::Result(r) if r.role == "validate" => validate_summary(r),
        Event::Result(r) => {
            if r.ok {
                format!(
                    "done: {} now runs as {} (frozen {} ms, total {} ms, {:.1} MB sent for {:.1} MB of data)",
                    r.container,
                    r.dest_id,
                    r.frozen_ms.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
                    r.total_ms,
                    r.bytes_sent as f64 / 1e6,
                    r.bytes_raw as f64 / 1e6
                )
            } else {
                format!(
                    "failed: {} (source: {})",
                    r.error.as_deref().unwrap_or("unknown error"),
                    r.source_state.as_deref().unwrap_or("unknown")
                )
            }
        }
    })
}

/// `validate`'s summary of a migration it checked.
fn validate_summary(r: &ResultEvent) -> String {
    let frozen = r.frozen_ms.map(|f| format!("{f} ms")).unwrap_or_else(|| "-".into());
    let sent = format!("{:.1} MB sent", r.bytes_sent as f64 / 1e6);
    let workload = r.workload.as_deref().unwrap_or("counter");
    let Some(answers) = r.answers_checked else {
        return format!("validated: the {workload} fixture moved to the other host and kept counting; frozen {frozen}, {sent}; everything removed");
    };
    let what = match workload {
        "redis" => "SET/GET rounds on one connection",
        "nginx" => "4 MiB downloads on one keep-alive connection",
        "postgres" => "pgbench transactions committed, none failed",
        _ => "answers",
    };
    let gap = r.client_longest_gap_ms.map(|g| format!("{g} ms")).unwrap_or_else(|| "-".into());
    format!(
        "validated: {workload} moved to the other host under its client: {answers} {what}, every answer right, \
         longest wait {gap}; frozen {frozen}, {sent}; one copy left, everything removed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_towards_a_known_size_has_a_percent_and_the_time_left() {
        // 25 MB of 100 MB in 1 s: a quarter done, 3 s left at that rate.
        match progress_event(Phase::Dump, 25_000_000, Some(100_000_000), Duration::from_secs(1)) {
            Event::Progress { percent, eta_s, mb_per_s, .. } => assert_eq!((percent, eta_s, mb_per_s), (Some(25.0), Some(3), 25.0)),
            other => panic!("{other:?}"),
        }
        // An estimate passed: 100 %, nothing left; an unknown size: neither.
        match progress_event(Phase::Dump, 120, Some(100), Duration::from_secs(1)) {
            Event::Progress { percent, eta_s, .. } => assert_eq!((percent, eta_s), (Some(100.0), Some(0))),
            other => panic!("{other:?}"),
        }
        let unknown = progress_event(Phase::RootfsSync, 5, None, Duration::from_secs(1));
        assert!(matches!(unknown, Event::Progress { percent: None, eta_s: None, total: None, .. }));
        assert_eq!(human_line(&progress_event(Phase::Dump, 25_000_000, Some(100_000_000), Duration::from_secs(1))).unwrap(), "dump: 25.0 of 100.0 MB (25%) at 25 MB/s, about 3 s left");
    }

    #[test]
    fn one_migration_of_several_says_which_container_its_events_are_about() {
        let rep = Reporter::with_mode(ReportMode::Quiet).for_container("web");
        let line: serde_json::Value = serde_json::from_str(&rep.json_line(&Event::Phase { phase: Phase::Dump, elapsed_ms: 5 })).unwrap();
        assert_eq!(line["container"], "web");
        // A result names its own container already; it is kept.
        let result = Event::Result(ResultEvent { container: "web".into(), ..Default::default() });
        let line: serde_json::Value = serde_json::from_str(&rep.json_line(&result)).unwrap();
        assert_eq!(line["container"], "web");
        assert_eq!(rep.prefix(), "web: ");
    }
}
