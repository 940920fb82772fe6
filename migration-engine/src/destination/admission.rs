//! Which authenticated migrations a receiver takes on, and with how much
//! memory.
//!
//! A receiver serves several migrations at once (see [`super::listener`]).
//! Each one that passed the handshake asks here twice:
//!
//! 1. right after the sender's Hello, for a migration slot
//!    ([`Admission::begin`]): at most `--max-migrations` at once, and with
//!    `--once` only the first ever;
//! 2. when its manifest arrives, before anything is staged
//!    ([`Admission::admit`]): its destination id must not be one another
//!    migration in flight is creating, and the memory its images reserve
//!    (`--stage-images memory|auto`, see [`crate::scratch::Reserve`]) must
//!    fit in the staging budget (`--staging-memory`, by default three
//!    quarters of MemAvailable) beside what the migrations in flight hold.
//!
//! A refusal reaches the sender as an Error message before ManifestAccepted,
//! so its source is never frozen. What was granted is given back when the
//! [`MigrationSlot`] and the [`Ticket`] are dropped (the ticket with the
//! migration's staging, after its bundle is removed).

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::scratch::StageMode;

/// The operator's bounds (receiver options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// `--max-migrations`.
    pub max_migrations: usize,
    /// `--staging-memory`: bytes all migrations in flight may reserve for
    /// images in memory; None: three quarters of MemAvailable, measured at
    /// each admission.
    pub staging_memory: Option<u64>,
    /// `--once`: only the first migration is served.
    pub once: bool,
}

pub const DEFAULT_MAX_MIGRATIONS: usize = 4;

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self { max_migrations: DEFAULT_MAX_MIGRATIONS, staging_memory: None, once: false }
    }
}

impl From<&crate::ReceiveOptions> for AdmissionLimits {
    fn from(o: &crate::ReceiveOptions) -> Self {
        Self { max_migrations: o.max_migrations, staging_memory: o.staging_memory, once: o.once }
    }
}

/// Why a migration is not taken on. Shown to the sender as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the receiver is busy: it already runs {max} migration(s) at once (--max-migrations {max}); try again when one has finished")]
    Busy { max: usize },
    #[error("the receiver serves a single migration (--once) and another sender's is under way; start another receiver")]
    OnceTaken,
    #[error("a migration to destination id `{0}` is already under way on this receiver: wait for it, or choose another --dest-id")]
    DestInFlight(String),
    #[error(
        "the receiver cannot stage {need_mib} MiB of images in memory now: {held_mib} MiB of its {budget_mib} MiB staging budget \
         (--staging-memory) is held by {in_flight} migration(s) in flight; try again later, or run the receiver with \
         --stage-images auto or disk"
    )]
    Memory { need_mib: u64, held_mib: u64, budget_mib: u64, in_flight: usize },
}

#[derive(Debug, Default)]
struct State {
    migrations: usize,
    once_claimed: bool,
    dest_ids: BTreeSet<String>,
    /// Bytes reserved for images in memory by the migrations in flight,
    /// and how many hold some.
    staged: u64,
    staging: usize,
}

/// The registry of migrations in flight. A receiver process has one
/// ([`REGISTRY`]); tests make their own.
#[derive(Debug)]
pub struct Admission {
    state: Mutex<State>,
}

/// The process's registry.
pub static REGISTRY: Admission = Admission::new();

impl Default for Admission {
    fn default() -> Self {
        Self::new()
    }
}

/// A migration slot, given back on drop.
#[derive(Debug)]
pub struct MigrationSlot<'a> {
    owner: &'a Admission,
}

impl MigrationSlot<'_> {
    /// The connection was not a migration (a source asking about one):
    /// its slot goes back, and --once still waits for a migration.
    pub fn not_a_migration(self) {
        self.owner.state.lock().unwrap().once_claimed = false;
    }
}

impl Drop for MigrationSlot<'_> {
    fn drop(&mut self) {
        self.owner.state.lock().unwrap().migrations -= 1;
    }
}

/// What a manifest was granted: its destination id, and the bytes it may
/// reserve for its images in memory (None: stage them on disk). Given back
/// on drop.
#[derive(Debug)]
pub struct Ticket {
    owner: &'static Admission,
    dest_id: String,
    memory: Option<u64>,
}

impl Ticket {
    /// Whether the images wait in memory (a tmpfs with a reserve).
    pub fn in_memory(&self) -> bool {
        self.memory.is_some()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.owner.state.lock().unwrap();
        st.dest_ids.remove(&self.dest_id);
        if let Some(bytes) = self.memory {
            st.staged -= bytes;
            st.staging -= 1;
        }
    }
}

/// The memory a migration reserves before the freeze when its images wait
/// in memory: the images' reserve and the restore's first read block, each
/// rounded up to MiB as [`crate::scratch::Reserve`] writes them.
pub fn reservation_bytes(memory_bytes: u64) -> u64 {
    let mib = |b: u64| b.div_ceil(1 << 20) << 20;
    mib(memory_bytes) + mib(crate::scratch::restore_block_bytes(memory_bytes))
}

/// Where a migration's images wait, given what is held already: Ok(Some)
/// bytes to reserve in memory, Ok(None) on disk, or a refusal. `available`
/// is MemAvailable now.
pub fn staging_decision(
    mode: StageMode,
    memory_bytes: u64,
    budget: Option<u64>,
    held: u64,
    in_flight: usize,
    available: u64,
) -> Result<Option<u64>, Refusal> {
    let need = reservation_bytes(memory_bytes);
    let budget = budget.unwrap_or(available / 4 * 3);
    let fits = held.saturating_add(need) <= budget;
    match mode {
        StageMode::Disk => Ok(None),
        StageMode::Memory if fits => Ok(Some(need)),
        StageMode::Memory => {
            Err(Refusal::Memory { need_mib: need >> 20, held_mib: held >> 20, budget_mib: budget >> 20, in_flight })
        }
        // As before: memory when the images fit in half of what is
        // available, and now also in what the budget has left; else disk.
        StageMode::Auto => Ok((fits && crate::scratch::memory_stage_size(StageMode::Auto, memory_bytes).is_some()).then_some(need)),
    }
}

impl Admission {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                migrations: 0,
                once_claimed: false,
                dest_ids: BTreeSet::new(),
                staged: 0,
                staging: 0,
            }),
        }
    }

    /// A slot for a migration whose sender passed the handshake.
    pub fn begin(&self, limits: &AdmissionLimits) -> Result<MigrationSlot<'_>, Refusal> {
        let mut st = self.state.lock().unwrap();
        if limits.once && st.once_claimed {
            return Err(Refusal::OnceTaken);
        }
        if st.migrations >= limits.max_migrations.max(1) {
            return Err(Refusal::Busy { max: limits.max_migrations.max(1) });
        }
        st.migrations += 1;
        st.once_claimed = true;
        Ok(MigrationSlot { owner: self })
    }

    /// Admits a manifest: its destination id, and where its images wait.
    pub fn admit(
        &'static self,
        limits: &AdmissionLimits,
        dest_id: &str,
        mode: StageMode,
        memory_bytes: u64,
    ) -> Result<Ticket, Refusal> {
        self.admit_with(limits, dest_id, mode, memory_bytes, crate::scratch::available_memory)
    }

    fn admit_with(
        &'static self,
        limits: &AdmissionLimits,
        dest_id: &str,
        mode: StageMode,
        memory_bytes: u64,
        available: impl FnOnce() -> u64,
    ) -> Result<Ticket, Refusal> {
        let mut st = self.state.lock().unwrap();
        if st.dest_ids.contains(dest_id) {
            return Err(Refusal::DestInFlight(dest_id.to_string()));
        }
        let memory = staging_decision(mode, memory_bytes, limits.staging_memory, st.staged, st.staging, available())?;
        st.dest_ids.insert(dest_id.to_string());
        if let Some(bytes) = memory {
            st.staged += bytes;
            st.staging += 1;
        }
        Ok(Ticket { owner: self, dest_id: dest_id.to_string(), memory })
    }
}

/// `--staging-memory`: bytes with an optional K, M, G or T suffix (powers
/// of 1024), e.g. `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size `{s}`: expected bytes such as 512M, 2G or 1073741824");
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(bad());
    }
    let bytes = v * (1u64 << shift) as f64;
    if bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn leak() -> &'static Admission {
        Box::leak(Box::new(Admission::new()))
    }

    #[test]
    fn migrations_are_bounded_and_slots_come_back() {
        let a = leak();
        let limits = AdmissionLimits { max_migrations: 2, ..Default::default() };
        let one = a.begin(&limits).unwrap();
        let two = a.begin(&limits).unwrap();
        assert_eq!(a.begin(&limits).unwrap_err(), Refusal::Busy { max: 2 });
        drop(one);
        let three = a.begin(&limits).unwrap();
        drop((two, three));
        assert!(a.begin(&limits).is_ok());
    }

    #[test]
    fn once_serves_the_first_migration_only() {
        let a = leak();
        let limits = AdmissionLimits { once: true, ..Default::default() };
        let first = a.begin(&limits).unwrap();
        assert_eq!(a.begin(&limits).unwrap_err(), Refusal::OnceTaken);
        drop(first);
        assert_eq!(a.begin(&limits).unwrap_err(), Refusal::OnceTaken, "--once never serves a second");
    }

    #[test]
    fn one_destination_id_at_a_time() {
        let a = leak();
        let limits = AdmissionLimits::default();
        let t = a.admit_with(&limits, "web", StageMode::Disk, MIB, || 1 << 30).unwrap();
        let refused = a.admit_with(&limits, "web", StageMode::Disk, MIB, || 1 << 30).unwrap_err();
        assert_eq!(refused, Refusal::DestInFlight("web".into()));
        assert!(refused.to_string().contains("already under way"), "{refused}");
        let other = a.admit_with(&limits, "db", StageMode::Disk, MIB, || 1 << 30).unwrap();
        drop(t);
        assert!(a.admit_with(&limits, "web", StageMode::Disk, MIB, || 1 << 30).is_ok(), "given back on drop");
        drop(other);
    }

    #[test]
    fn reservations_count_the_restore_block_in_whole_mib() {
        assert_eq!(reservation_bytes(3 * MIB + 1), 8 * MIB);
        assert_eq!(reservation_bytes(1 << 30), (1 << 30) + 128 * MIB);
    }

    #[test]
    fn memory_staging_is_admitted_against_what_is_in_flight() {
        let a = leak();
        // One 10 MiB container reserves 20 MiB: one fits in 30, two do not.
        let limits = AdmissionLimits { staging_memory: Some(30 * MIB), ..Default::default() };
        let first = a.admit_with(&limits, "a", StageMode::Memory, 10 * MIB, || 64 << 30).unwrap();
        assert!(first.in_memory());
        let refused = a.admit_with(&limits, "b", StageMode::Memory, 10 * MIB, || 64 << 30).unwrap_err();
        assert_eq!(refused, Refusal::Memory { need_mib: 20, held_mib: 20, budget_mib: 30, in_flight: 1 });
        assert!(refused.to_string().contains("--staging-memory"), "{refused}");
        // auto stages on disk instead of refusing; disk always fits.
        let auto = a.admit_with(&limits, "c", StageMode::Auto, 10 * MIB, || 64 << 30).unwrap();
        assert!(!auto.in_memory());
        assert!(!a.admit_with(&limits, "d", StageMode::Disk, 10 * MIB, || 64 << 30).unwrap().in_memory());
        // A refused manifest holds nothing: `b` can come again later.
        drop(first);
        assert!(a.admit_with(&limits, "b", StageMode::Memory, 10 * MIB, || 64 << 30).unwrap().in_memory());
    }

    #[test]
    fn the_default_budget_is_three_quarters_of_what_is_available() {
        assert_eq!(staging_decision(StageMode::Memory, 10 * MIB, None, 0, 0, 80 * MIB), Ok(Some(20 * MIB)));
        assert_eq!(staging_decision(StageMode::Memory, 10 * MIB, None, 50 * MIB, 2, 80 * MIB).unwrap_err(),
            Refusal::Memory { need_mib: 20, held_mib: 50, budget_mib: 60, in_flight: 2 });
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        for bad in ["", "G", "-1G", "lots", "1e30T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
