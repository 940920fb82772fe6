//! Several containers in one command: `send ID...` and `evacuate` (every
//! running container of a runtime root).
//!
//! ```text
//!   containers ─ grouped into units (crate::pods) ─ queue ─┬─ worker 1: unit → send() (a pod: one thread a member)
//!                                                          ├─ worker 2: ...            (at most --parallel units at once)
//!                                                          └─ ...
//!   every migration's bytes go through one shared Rate (--bwlimit is the link's, not each one's)
//!   → one outcome a container → the summary (text, or a JSON `summary` event) → the exit code
//! ```
//!
//! Each container keeps its own migration: its journal entry, its freeze
//! guard, its rollback. A failure moves nothing else back: the others go
//! on. A pod's members succeed or fail together ([`crate::source::pod`]).
//! The exit code is 0 when every container moved, else the most serious of
//! the outcomes (3 untouched < 4 resumed < 5 not resumed < 6 in doubt).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use container_runtime::{ContainerStatus, Runc};
use serde::Serialize;

use crate::events::Event;
use crate::pods::{Member, Unit};
use crate::source::pod::{PodBarrier, PodMember};
use crate::{MigrationError, Outcome, Reporter, SendOptions};

/// What to move, and how many at once.
#[derive(Debug, Clone)]
pub struct EvacuateOptions {
    /// What every migration shares; its `container`, `dest_id` and `pod`
    /// are set for each container.
    pub send: SendOptions,
    /// The containers to move (`send ID...`); None: every running
    /// container of the runtime root (`evacuate`).
    pub containers: Option<Vec<String>>,
    /// Most units (a container, or a pod) in flight at once.
    pub parallel: usize,
    /// How many may be frozen at once; None: [`FreezeSlots::for_this_host`].
    pub freeze_slots: Option<Arc<FreezeSlots>>,
}

/// What became of one container.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerOutcome {
    pub container: String,
    pub moved: bool,
    /// `migrated`, or where it stayed: `running` (untouched or resumed),
    /// `not-resumed`, `in-doubt`.
    pub source_state: String,
    /// Why it stayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// 0 when it moved, else its migration's exit code.
    pub exit_code: i32,
    /// The pod it moved (or stayed) with, by its leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
    pub total_ms: u64,
}

/// The evacuation's summary: the `summary` event, and the exit code.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub moved: usize,
    pub stayed: usize,
    pub parallel: usize,
    pub total_ms: u64,
    pub exit_code: i32,
    pub containers: Vec<ContainerOutcome>,
}

/// How many of an evacuation's migrations may be frozen at once. The
/// others go on with what they do while their container runs (connect,
/// rootfs sync, pre-copy) and wait for a slot before the freeze: frozen
/// windows that overlap share the CPUs, and each lasts longer
/// (docs/performance.md, "evacuate").
#[derive(Debug)]
pub struct FreezeSlots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A slot taken; given back when dropped.
#[derive(Debug)]
pub struct FreezeSlot(Arc<FreezeSlots>);

impl FreezeSlots {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self { free: Mutex::new(slots.max(1)), freed: std::sync::Condvar::new() })
    }

    /// One a core pair: a frozen window keeps about two CPUs busy (CRIU
    /// and the sender's stream, then the destination's restore).
    pub fn for_this_host() -> Arc<Self> {
        Self::new(std::thread::available_parallelism().map(|n| n.get() / 2).unwrap_or(1))
    }

    /// Waits for a slot, calling `still_there` every second meanwhile;
    /// None when it says false.
    pub fn acquire(self: &Arc<Self>, still_there: &mut dyn FnMut() -> bool) -> Option<FreezeSlot> {
        let mut free = self.free.lock().unwrap();
        loop {
            if *free > 0 {
                *free -= 1;
                return Some(FreezeSlot(self.clone()));
            }
            free = self.freed.wait_timeout(free, std::time::Duration::from_secs(1)).unwrap().0;
            if *free == 0 {
                drop(free);
                if !still_there() {
                    return None;
                }
                free = self.free.lock().unwrap();
            }
        }
    }
}

impl Drop for FreezeSlot {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap() += 1;
        self.0.freed.notify_one();
    }
}

/// Units in flight at once when `--parallel` is not given: one a core,
/// at most one per 2 GiB of available memory (each stages images and
/// holds buffers), between 1 and 4.
pub fn default_parallel() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    use procfs::Current;
    let available = procfs::Meminfo::current().ok().and_then(|m| m.mem_available).unwrap_or(0);
    let by_memory = (available / (2 << 30)) as usize;
    cores.min(by_memory).clamp(1, 4)
}

/// Moves the containers; Err only for input refused before anything
/// moved (a named container that does not exist or does not run).
pub fn evacuate(opts: &EvacuateOptions, rep: &Reporter) -> Result<Summary, MigrationError> {
    let started = Instant::now();
    let runc = Runc::new(&opts.send.runc_binary, &opts.send.runtime_root);
    let members = running_members(&runc, opts.containers.as_deref(), rep)?;
    let units = crate::pods::group(&members, &|m, kind| crate::pods::namespace_of(m.init_pid, kind), &|kind| crate::pods::namespace_of(1, kind), &|group, kind| {
        let inits: Vec<i32> = group.iter().map(|m| m.init_pid).collect();
        crate::pods::namespace_sharers(group[0].init_pid, kind, &crate::pods::in_cgroups_of(&inits))
    });
    let parallel = opts.parallel.max(1);
    rep.note(format!(
        "moving {} container(s) in {} unit(s), at most {parallel} at once{}",
        members.len(),
        units.len(),
        opts.send.bwlimit.as_ref().map(|r| format!(", {} bytes/s shared", r.bytes_per_s())).unwrap_or_default()
    ));
    let queue = Mutex::new(units.into_iter().collect::<VecDeque<Unit>>());
    let mut send = opts.send.clone();
    send.freeze_slots = Some(opts.freeze_slots.clone().unwrap_or_else(FreezeSlots::for_this_host));
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| loop {
                let Some(unit) = queue.lock().unwrap().pop_front() else { return };
                let moved = if crate::interrupt::interrupted() {
                    stayed_all(&unit.members(), "not started: the evacuation was interrupted")
                } else {
                    move_unit(&send, unit, rep)
                };
                outcomes.lock().unwrap().extend(moved);
            });
        }
    });
    // In the order the containers were listed.
    let mut containers = outcomes.into_inner().unwrap();
    containers.sort_by_key(|o| members.iter().position(|m| m.id == o.container));
    let moved = containers.iter().filter(|o| o.moved).count();
    let summary = Summary {
        moved,
        stayed: containers.len() - moved,
        parallel,
        total_ms: started.elapsed().as_millis() as u64,
        exit_code: containers.iter().map(|o| o.exit_code).max().unwrap_or(0),
        containers,
    };
    rep.emit(Event::Summary(summary.clone()));
    Ok(summary)
}

/// The containers to move, as grouping needs them. Named ones must exist
/// and run; for `evacuate`, those not running are left out (and said).
fn running_members(runc: &Runc, named: Option<&[String]>, rep: &Reporter) -> Result<Vec<Member>, MigrationError> {
    let ids = match named {
        Some(ids) => ids.to_vec(),
        None => runc.list()?,
    };
    let mut members = Vec::new();
    for id in ids {
        container_runtime::validate_container_id(&id)?;
        if members.iter().any(|m: &Member| m.id == id) {
            return Err(MigrationError::Usage(format!("container `{id}` is named twice")));
        }
        let state = match runc.state(&id) {
            Ok(s) if s.status() == ContainerStatus::Running => s,
            Ok(s) if named.is_none() => {
                rep.note(format!("`{id}` is {}, not running: left as it is", s.status));
                continue;
            }
            Ok(s) => return Err(MigrationError::Preflight(format!("container `{id}` is {}, not running: only running containers move", s.status))),
            Err(e) => return Err(MigrationError::Preflight(format!("container `{id}`: {e}"))),
        };
        let internal = runc.internal_state(&id)?;
        let joins_network = internal.config.namespaces.iter().any(|n| n.kind == "NEWNET" && !n.path.is_empty());
        members.push(Member { id, init_pid: state.pid, joins_network });
    }
    if members.is_empty() {
        rep.note("no running container to move");
    }
    Ok(members)
}

/// Moves one unit: a container alone, or a pod (one thread a member).
fn move_unit(template: &SendOptions, unit: Unit, rep: &Reporter) -> Vec<ContainerOutcome> {
    match unit {
        Unit::Stays { members, reason } => {
            for m in &members {
                rep.for_container(m).warn(format!("stays: {reason}"));
            }
            let mut stayed = stayed_all(&members, &reason);
            if members.len() > 1 {
                for o in &mut stayed {
                    o.pod = Some(members[0].clone());
                }
            }
            stayed
        }
        Unit::Single(id) => {
            let mut opts = template.clone();
            opts.container = id.clone();
            opts.dest_id = None;
            opts.pod = None;
            vec![send_one(&opts, &rep.for_container(&id), None)]
        }
        Unit::Pod { leader, mut members, shared_net, shared_ipc } => {
            // The leader first: the destination admits its members after it.
            members.sort_by_key(|m| *m != leader);
            let barrier = PodBarrier::new(members.len());
            let wire = migration_protocol::PodWire {
                id: format!("pod-{}", crate::journal::new_migration_id()),
                leader: leader.clone(),
                members: members.clone(),
                shares_network: shared_net,
                shares_ipc: shared_ipc,
            };
            let outcomes = Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for id in &members {
                    let mut opts = template.clone();
                    opts.container = id.clone();
                    opts.dest_id = None;
                    opts.pod = Some(PodMember { barrier: barrier.clone(), wire: wire.clone(), leader: *id == leader });
                    let (outcomes, leader) = (&outcomes, leader.clone());
                    scope.spawn(move || {
                        let outcome = send_one(&opts, &rep.for_container(&opts.container), Some(leader));
                        outcomes.lock().unwrap().push(outcome);
                    });
                }
            });
            outcomes.into_inner().unwrap()
        }
    }
}

fn send_one(opts: &SendOptions, rep: &Reporter, pod: Option<String>) -> ContainerOutcome {
    let started = Instant::now();
    match crate::send(opts, rep) {
        Ok(result) => ContainerOutcome {
            container: opts.container.clone(),
            moved: true,
            source_state: "migrated".into(),
            reason: None,
            exit_code: 0,
            pod,
            migration_id: result.migration_id,
            frozen_ms: result.frozen_ms,
            total_ms: result.total_ms,
        },
        Err(failure) => ContainerOutcome {
            container: opts.container.clone(),
            moved: false,
            source_state: source_state(failure.outcome).into(),
            reason: Some(failure.error.to_string()),
            exit_code: failure.outcome.exit_code(),
            pod,
            migration_id: None,
            frozen_ms: None,
            total_ms: started.elapsed().as_millis() as u64,
        },
    }
}

fn source_state(o: Outcome) -> &'static str {
    match o {
        Outcome::NothingTouched | Outcome::SourceResumed => "running",
        Outcome::SourceNotResumed => "not-resumed",
        Outcome::Uncertain => "in-doubt",
    }
}

fn stayed_all(members: &[String], reason: &str) -> Vec<ContainerOutcome> {
    members
        .iter()
        .map(|container| ContainerOutcome {
            container: container.clone(),
            moved: false,
            source_state: "running".into(),
            reason: Some(reason.to_string()),
            exit_code: Outcome::NothingTouched.exit_code(),
            pod: None,
            migration_id: None,
            frozen_ms: None,
            total_ms: 0,
        })
        .collect()
}

/// The summary as text: a line for the whole, then one a container.
pub fn summary_lines(s: &Summary) -> Vec<String> {
    let mut lines = vec![format!(
        "{} of {} container(s) moved in {:.1} s (at most {} at once){}",
        s.moved,
        s.moved + s.stayed,
        s.total_ms as f64 / 1000.0,
        s.parallel,
        if s.stayed > 0 { format!("; {} stayed", s.stayed) } else { String::new() }
    )];
    for o in &s.containers {
        let pod = o.pod.as_ref().map(|p| format!(" [pod {p}]")).unwrap_or_default();
        lines.push(if o.moved {
            format!("  moved   {}{pod} (frozen {} ms, total {} ms)", o.container, o.frozen_ms.map(|f| f.to_string()).unwrap_or_else(|| "-".into()), o.total_ms)
        } else {
            format!("  stayed  {}{pod}: {} (exit {}): {}", o.container, o.source_state, o.exit_code, o.reason.as_deref().unwrap_or("-"))
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: &str, code: i32) -> ContainerOutcome {
        ContainerOutcome {
            container: id.into(),
            moved: code == 0,
            source_state: if code == 0 { "migrated" } else { "running" }.into(),
            reason: (code != 0).then(|| "the receiver refused it".into()),
            exit_code: code,
            pod: None,
            migration_id: None,
            frozen_ms: (code == 0).then_some(120),
            total_ms: 900,
        }
    }

    #[test]
    fn the_summary_says_which_moved_and_which_stayed_and_why() {
        let s = Summary { moved: 1, stayed: 1, parallel: 2, total_ms: 1500, exit_code: 4, containers: vec![outcome("web", 0), outcome("db", 4)] };
        let lines = summary_lines(&s);
        assert_eq!(lines[0], "1 of 2 container(s) moved in 1.5 s (at most 2 at once); 1 stayed");
        assert!(lines[1].contains("moved   web") && lines[1].contains("frozen 120 ms"));
        assert!(lines[2].contains("stayed  db: running (exit 4): the receiver refused it"), "{}", lines[2]);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["containers"][1]["exit_code"], 4);
        assert_eq!(json["containers"][0]["moved"], true);
    }

    #[test]
    fn a_unit_that_stays_keeps_every_member_running() {
        let stayed = stayed_all(&["a".into(), "b".into()], "why");
        assert_eq!(stayed.len(), 2);
        assert!(stayed.iter().all(|o| !o.moved && o.exit_code == 3 && o.source_state == "running"));
    }

    #[test]
    fn freeze_slots_let_so_many_freeze_at_once_and_no_more() {
        let slots = FreezeSlots::new(1);
        let first = slots.acquire(&mut || true).unwrap();
        let s = slots.clone();
        let waiting = std::thread::spawn(move || s.acquire(&mut || true).map(drop).is_some());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiting.is_finished(), "a second migration froze with the only slot taken");
        drop(first);
        assert!(waiting.join().unwrap());
        // A waiter whose receiver is gone gives up.
        let _held = slots.acquire(&mut || true).unwrap();
        assert!(slots.acquire(&mut || false).is_none());
    }

    #[test]
    fn the_default_parallelism_is_bounded() {
        let p = default_parallel();
        assert!((1..=4).contains(&p));
    }
}
