//! Migrations whose outcome a side does not know, settled from the
//! journal: the source asks the destination ([`ask_destination`]) and acts
//! on the answer ([`settle_source`]); a destination whose receiver died
//! finishes or undoes its copy ([`recover_destination`]) and answers the
//! source's questions ([`answer_query`]); an operator lists them
//! ([`status`]) and settles one by hand ([`resolve`]).
//!
//! The rule that keeps one copy: the source's copy is thawed only when the
//! destination says it removed its own (or an operator says so), and
//! removed only when the destination says its copy is committed (or an
//! operator says so). The destination decides on its own before Commit
//! (presumed abort) and never undoes a commit.

use std::time::{Duration, Instant};

use migration_protocol::state::SourceEvent;
use migration_protocol::{DestinationState, MessageKind, PeerDecision, Query, QueryAnswer, SourceFate, SourceMachine, SourceState};

use crate::journal::{Entry, Journal, Role, Side, SourcePlan};
use crate::source::{connect_peer, PeerLink};
use crate::tls::Security;
use crate::transport::Destination;
use crate::{settle, MigrationError, Outcome};

/// Asks the destination once what became of the migration of `entry`.
pub fn ask_destination(entry: &Entry, plan: &SourcePlan, io_timeout: Duration) -> Result<PeerDecision, MigrationError> {
    let to: Destination = plan.destination.parse()?;
    let security = match &plan.tls_dir {
        Some(dir) => Security::Tls(dir.clone()),
        None => Security::Insecure,
    };
    let link = PeerLink {
        to: &to,
        security: &security,
        io_timeout,
        bwlimit: None,
        ssh_options: &plan.ssh_options,
        remote_command: &plan.remote_command,
    };
    let (mut peer, _) = connect_peer(&link, None, false)?;
    peer.writer.write_json(MessageKind::Query, &Query { migration_id: entry.id.clone(), dest_id: entry.dest_id.clone() })?;
    peer.flush()?;
    let answer: QueryAnswer = peer.read_with_timeout(io_timeout)?.expect(MessageKind::QueryAnswer, "QueryAnswer")?.json()?;
    if answer.migration_id != entry.id {
        return Err(MigrationError::Other(format!("the destination answered about migration {} instead of {}", answer.migration_id, entry.id)));
    }
    Ok(answer.decision)
}

/// How long to keep asking.
#[derive(Debug, Clone, Copy)]
pub struct AskLimits {
    /// For one question.
    pub io: Duration,
    /// For all of them.
    pub total: Duration,
}

fn journal_state(journal: &Journal, entry: &mut Entry, state: SourceState, note: &dyn Fn(&str)) {
    entry.set_source_state(state);
    if let Err(e) = journal.write(entry) {
        note(&format!("cannot journal {state:?}: {e}"));
    }
}

/// Settles a source copy whose Commit went out unanswered: asks the
/// destination, with backoff, until it says committed (the source is
/// removed) or aborted (the source is thawed), or `limits.total` passes
/// (the source stays frozen, in doubt). Returns the fate and what the
/// destination last said (or why it could not be asked).
pub fn settle_source(journal: &Journal, entry: &mut Entry, limits: AskLimits, note: &dyn Fn(&str)) -> (SourceFate, String) {
    let Side::Source { state, plan } = entry.side.clone() else {
        return (SourceFate::InDoubt, "not a source entry".into());
    };
    let mut machine = SourceMachine::at(state);
    if machine.state() == SourceState::CommitSent && machine.on(SourceEvent::AckLost).is_ok() {
        journal_state(journal, entry, SourceState::InDoubt, note);
    }
    let deadline = Instant::now() + limits.total;
    let mut pause = Duration::from_millis(250);
    let mut last;
    loop {
        match ask_destination(entry, &plan, limits.io) {
            Ok(decision) => {
                last = format!("the destination says {}", decision_name(decision));
                if let Err(e) = machine.on(SourceEvent::PeerSays(decision)) {
                    return (SourceFate::InDoubt, format!("{last}, which cannot be applied here: {e}"));
                }
            }
            Err(e) => last = format!("cannot ask the destination: {e}"),
        }
        match machine.state() {
            SourceState::Committed => {
                for w in settle::remove_source(&plan, &entry.container) {
                    note(&format!("migrated, but {w}"));
                }
                let _ = machine.on(SourceEvent::SourceRemoved);
                journal_state(journal, entry, SourceState::Migrated, note);
                return (SourceFate::Migrated, last);
            }
            SourceState::Thawing => {
                let thawed = settle::thaw_source(&plan, &entry.container);
                let event = if thawed.is_ok() { SourceEvent::Thawed } else { SourceEvent::ThawFailed };
                let _ = machine.on(event);
                journal_state(journal, entry, machine.state(), note);
                if let Err(e) = thawed {
                    last = format!("{last}; AND THE SOURCE COULD NOT BE RESUMED: {e}");
                }
                return (machine.fate().unwrap_or(SourceFate::NotResumed), last);
            }
            _ => {}
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = machine.on(SourceEvent::GaveUp);
            journal_state(journal, entry, SourceState::LeftInDoubt, note);
            return (SourceFate::InDoubt, last);
        }
        note(&format!("migration {} in doubt: {last}; asking again", entry.id));
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn decision_name(d: PeerDecision) -> &'static str {
    match d {
        PeerDecision::Committed => "it committed and runs the container",
        PeerDecision::Aborted => "it removed its copy",
        PeerDecision::Pending => "it still waits for the commit",
        PeerDecision::Unknown => "it has no record of the migration but holds a container of that id",
    }
}

/// The sentence for a source left in doubt.
pub fn in_doubt_message(entry: &Entry, last: &str) -> String {
    format!(
        "migration {id} of `{c}` is in doubt ({last}): the source is frozen, not running, and nothing runs twice; \
         settle it with `ctmigrate resolve {id}` once the destination is reachable, or by hand with \
         `ctmigrate resolve {id} --keep source|destination`",
        id = entry.id,
        c = entry.container
    )
}

/// Finishes (committed) or undoes (anything before) a destination copy
/// whose receiver is gone. Returns the state it ends in.
pub fn recover_destination(journal: &Journal, entry: &mut Entry) -> Result<DestinationState, MigrationError> {
    let Side::Destination { state, plan } = entry.side.clone() else {
        return Err(MigrationError::Other("not a destination entry".into()));
    };
    // A pod member short of its own Commit when its receiver died, whose
    // pod was committed: the source sent Commits only once every member's
    // copy was restored and Ready, so this copy is whole; it runs too.
    let pod_committed = plan.pod.as_deref().is_some_and(|pod| journal.pod_committed(pod));
    // The IPC namespace's file a pod's leader made is for restores only,
    // and none runs for a dead receiver (the tasks hold the namespace).
    let _ = container_network::ipcns::remove_ipc_namespace(&entry.dest_id);
    let state = match state {
        s if pod_committed && !s.is_final() && s != DestinationState::Running => DestinationState::Committed,
        s => s,
    };
    let end = match state {
        DestinationState::Committed => {
            let _ = std::fs::remove_file(plan.bundle.join(crate::destination::INCOMPLETE_MARKER));
            crate::scratch::remove_work_dir(&plan.work_dir);
            settle::run_destination(&plan, &entry.dest_id)?;
            DestinationState::Running
        }
        DestinationState::Running => return Ok(state),
        _ => {
            // Journalled first: from now on the answer is "aborted".
            if state != DestinationState::Aborted && state != DestinationState::Refused {
                entry.set_destination_state(DestinationState::Aborted);
                journal.write(entry).map_err(|e| MigrationError::Other(e.to_string()))?;
            }
            settle::remove_destination(&plan, &entry.dest_id);
            return Ok(DestinationState::Aborted);
        }
    };
    entry.set_destination_state(end);
    journal.write(entry).map_err(|e| MigrationError::Other(e.to_string()))?;
    Ok(end)
}

/// Settles what receivers that died left open in `journal`. Returns one
/// line per entry settled (or that could not be).
pub fn recover_destinations(journal: &Journal) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in journal.list() {
        let Ok(mut entry) = entry else { continue };
        let Side::Destination { state, plan } = &entry.side else { continue };
        let leftovers = plan.bundle.join(crate::destination::INCOMPLETE_MARKER).exists();
        if entry.owner_alive() || (state.is_final() && !leftovers) || *state == DestinationState::Running {
            continue;
        }
        let before = entry.state_name();
        match recover_destination(journal, &mut entry) {
            Ok(end) => lines.push(format!("migration {} of `{}`: {before} when its receiver died; now {end:?}", entry.id, entry.dest_id)),
            Err(e) => lines.push(format!("migration {} of `{}`: {before} when its receiver died; cannot settle it: {e}", entry.id, entry.dest_id)),
        }
    }
    journal.prune();
    lines
}

/// What a sender starting up does with migrations its journal holds open
/// whose sender and guard are gone (both killed, or the host rebooted):
/// each is settled as `ctmigrate resolve` would (one question to the
/// destination for those in doubt). Returns one line per migration.
pub fn recover_sources(journal: &Journal, io_timeout: Duration, note: &dyn Fn(&str)) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in journal.list().into_iter().flatten() {
        if entry.role() != Role::Source || entry.is_finished() || entry.owner_alive() {
            continue;
        }
        let line = match resolve(journal, &entry.id, None, io_timeout, note) {
            Ok(done) => done,
            Err((e, _)) => e.to_string(),
        };
        lines.push(line);
    }
    lines
}

/// An unsettled migration of `container` in this host's journal, if any:
/// it must be settled before the container moves again.
pub fn open_migration_of(journal: &Journal, container: &str) -> Option<Entry> {
    journal.list().into_iter().flatten().find(|e| e.role() == Role::Source && e.container == container && !e.is_finished())
}

/// The destination's answer to a source asking about `q`.
pub fn answer_query(journal: &Journal, runc: &container_runtime::Runc, q: &Query) -> PeerDecision {
    if migration_protocol::validate_migration_id(&q.migration_id).is_err() || container_runtime::validate_container_id(&q.dest_id).is_err() {
        return PeerDecision::Unknown;
    }
    match journal.load(Role::Destination, &q.migration_id) {
        Ok(Some(mut entry)) => {
            let Side::Destination { state, .. } = entry.side else { return PeerDecision::Unknown };
            if entry.owner_alive() || state.is_final() {
                return state.answer();
            }
            // Its receiver died: settle it now, then answer.
            match recover_destination(journal, &mut entry) {
                Ok(end) => end.answer(),
                Err(_) => state.answer(),
            }
        }
        Ok(None) => match runc.exists(&q.dest_id) {
            Ok(false) => PeerDecision::Aborted,
            _ => PeerDecision::Unknown,
        },
        Err(_) => PeerDecision::Unknown,
    }
}

/// One migration as `ctmigrate status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusLine {
    pub id: String,
    pub role: &'static str,
    pub container: String,
    pub dest_id: String,
    pub peer: String,
    pub state: String,
    pub since_unix_ms: u64,
    /// A process is at it (the sender, its guard, the receiver).
    pub active: bool,
    pub in_doubt: bool,
}

/// Migrations journalled on this host: in flight or in doubt, or all.
pub fn status(journal: &Journal, all: bool) -> (Vec<StatusLine>, Vec<String>) {
    let mut lines = Vec::new();
    let mut damaged = Vec::new();
    for entry in journal.list() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                damaged.push(e.to_string());
                continue;
            }
        };
        if entry.is_finished() && !all {
            continue;
        }
        let in_doubt = matches!(&entry.side, Side::Source { state: SourceState::CommitSent | SourceState::InDoubt | SourceState::LeftInDoubt, .. })
            || (!entry.owner_alive() && !entry.is_finished());
        lines.push(StatusLine {
            id: entry.id.clone(),
            role: entry.role().name(),
            container: entry.container.clone(),
            dest_id: entry.dest_id.clone(),
            peer: entry.peer.clone(),
            state: entry.state_name(),
            since_unix_ms: entry.updated_ms(),
            active: entry.owner_alive() && !entry.is_finished(),
            in_doubt,
        });
    }
    (lines, damaged)
}

/// Which copy an operator keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Source,
    Destination,
}

/// `ctmigrate resolve ID [--keep ...]`: settles migration `id` on this host.
pub fn resolve(journal: &Journal, id: &str, keep: Option<Keep>, io_timeout: Duration, note: &dyn Fn(&str)) -> Result<String, (MigrationError, Outcome)> {
    let refused = |m: String| (MigrationError::Usage(m), Outcome::NothingTouched);
    let mut entry = journal.find(id).map_err(|e| refused(e.to_string()))?;
    if entry.is_finished() {
        return Ok(format!("migration {id} is already settled on this host: {}", entry.state_name()));
    }
    if entry.owner_alive() {
        return Err(refused(format!(
            "migration {id} is being settled by process {} (its sender, guard or receiver): wait for it, or stop it first",
            entry.owner_pid
        )));
    }
    // From here this process acts on it.
    entry.owner_pid = std::process::id();
    match entry.side.clone() {
        Side::Source { state, plan } => resolve_source(journal, &mut entry, state, &plan, keep, io_timeout, note),
        Side::Destination { .. } => resolve_destination(journal, &mut entry, keep),
    }
}

fn resolve_source(
    journal: &Journal,
    entry: &mut Entry,
    state: SourceState,
    plan: &SourcePlan,
    keep: Option<Keep>,
    io_timeout: Duration,
    note: &dyn Fn(&str),
) -> Result<String, (MigrationError, Outcome)> {
    let refused = |m: String| (MigrationError::Usage(m), Outcome::NothingTouched);
    let commit_went_out = matches!(state, SourceState::CommitSent | SourceState::InDoubt | SourceState::LeftInDoubt | SourceState::Committed);
    let id = entry.id.clone();
    if !commit_went_out {
        // The sender died before deciding to commit, and its guard did
        // not thaw the source: the destination aborts on its own.
        if keep == Some(Keep::Destination) {
            return Err(refused(format!("migration {id} never sent its Commit ({state:?}): the destination cannot run it; use --keep source")));
        }
        if state == SourceState::PostcopyRunning {
            // The destination's copy ran on a lease: it kills it once the
            // lease runs out unrenewed.
            let wait = crate::source::lease_wait(plan.postcopy_lease_ms);
            note(&format!("migration {id}: the destination's copy ran on a {} ms lease; thawing the source in {} ms", plan.postcopy_lease_ms, wait.as_millis()));
            std::thread::sleep(wait);
        }
        let thawed = settle::thaw_source(plan, &entry.container);
        journal_state(journal, entry, if thawed.is_ok() { SourceState::Resumed } else { SourceState::NotResumed }, note);
        return thawed
            .map(|()| format!("migration {id} never committed: the source was thawed and runs"))
            .map_err(|e| (e, Outcome::SourceNotResumed));
    }
    if state == SourceState::Committed {
        for w in settle::remove_source(plan, &entry.container) {
            note(&w);
        }
        journal_state(journal, entry, SourceState::Migrated, note);
        return Ok(format!("migration {id} had committed: the source was removed"));
    }
    let asked = ask_destination(entry, plan, io_timeout);
    let apply_keep_source = |journal: &Journal, entry: &mut Entry, why: &str| {
        let thawed = settle::thaw_source(plan, &entry.container);
        journal_state(journal, entry, if thawed.is_ok() { SourceState::Resumed } else { SourceState::NotResumed }, note);
        thawed.map(|()| format!("migration {id}: the source was thawed and runs ({why})")).map_err(|e| (e, Outcome::SourceNotResumed))
    };
    let apply_keep_destination = |journal: &Journal, entry: &mut Entry, why: &str| {
        for w in settle::remove_source(plan, &entry.container) {
            note(&w);
        }
        journal_state(journal, entry, SourceState::Migrated, note);
        Ok(format!("migration {id}: the source was removed; the destination keeps the container ({why})"))
    };
    match (asked, keep) {
        (Ok(PeerDecision::Committed), Some(Keep::Source)) => Err(refused(format!(
            "the destination says migration {id} committed and runs the container: keeping the source would run it twice; use --keep destination"
        ))),
        (Ok(PeerDecision::Aborted), Some(Keep::Destination)) => Err(refused(format!(
            "the destination says it removed its copy of migration {id}: use --keep source"
        ))),
        (Ok(PeerDecision::Pending), Some(_)) => Err(refused(format!(
            "the destination still waits for migration {id}'s commit and will abort on its own: run `ctmigrate resolve {id}` again in a moment"
        ))),
        (Ok(PeerDecision::Committed), _) => apply_keep_destination(journal, entry, "the destination says it committed"),
        (Ok(PeerDecision::Aborted), _) => apply_keep_source(journal, entry, "the destination says it removed its copy"),
        (Ok(d @ (PeerDecision::Unknown | PeerDecision::Pending)), None) => {
            Err((MigrationError::Other(in_doubt_message(entry, &format!("the destination says {}", decision_name(d)))), Outcome::Uncertain))
        }
        (Ok(PeerDecision::Unknown) | Err(_), Some(Keep::Source)) => {
            note(&format!(
                "the destination cannot confirm: make sure it does not run `{}` (on the destination: `ctmigrate resolve {id} --keep source`)",
                entry.dest_id
            ));
            apply_keep_source(journal, entry, "by the operator's word")
        }
        (Ok(PeerDecision::Unknown) | Err(_), Some(Keep::Destination)) => apply_keep_destination(journal, entry, "by the operator's word"),
        (Err(e), None) => Err((MigrationError::Other(in_doubt_message(entry, &format!("cannot ask the destination: {e}"))), Outcome::Uncertain)),
    }
}

fn resolve_destination(journal: &Journal, entry: &mut Entry, keep: Option<Keep>) -> Result<String, (MigrationError, Outcome)> {
    let Side::Destination { state, plan } = entry.side.clone() else { unreachable!("checked by the caller") };
    let id = entry.id.clone();
    let failed = |e: MigrationError| (e, Outcome::SourceNotResumed);
    match keep {
        None => recover_destination(journal, entry)
            .map(|end| format!("migration {id} was {state:?} when its receiver died: now {end:?}"))
            .map_err(failed),
        Some(Keep::Source) => {
            entry.set_destination_state(DestinationState::Aborted);
            journal.write(entry).map_err(|e| failed(MigrationError::Other(e.to_string())))?;
            settle::remove_destination(&plan, &entry.dest_id);
            Ok(format!("migration {id}: the destination's copy `{}` was removed", entry.dest_id))
        }
        Some(Keep::Destination) => {
            if !plan.runc().exists(&entry.dest_id).unwrap_or(false) {
                return Err((
                    MigrationError::Usage(format!("migration {id}: no container `{}` on this host to keep: use --keep source", entry.dest_id)),
                    Outcome::NothingTouched,
                ));
            }
            if matches!(state, DestinationState::Receiving | DestinationState::Restoring) {
                return Err((
                    MigrationError::Usage(format!("migration {id} never finished its restore here ({state:?}): there is no whole copy to keep")),
                    Outcome::NothingTouched,
                ));
            }
            entry.set_destination_state(DestinationState::Committed);
            journal.write(entry).map_err(|e| failed(MigrationError::Other(e.to_string())))?;
            recover_destination(journal, entry).map_err(failed)?;
            Ok(format!("migration {id}: the destination's copy `{}` runs", entry.dest_id))
        }
    }
}
