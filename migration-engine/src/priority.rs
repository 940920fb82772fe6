//! Work done while a container still runs yields the CPUs to work done
//! while one is frozen. With several migrations at once (`evacuate`, a
//! receiver serving several senders), one container's frozen window would
//! otherwise share the CPUs with the others' preflight, rootfs sync and
//! staging (the receiver touching the memory it reserves for images), and
//! last up to twice as long (docs/performance.md, "evacuate").
//!
//! A thread doing running-phase work lowers its own priority (nice 10, a
//! tenth of the CPU share of nice 0 when they contend) and raises it back
//! to 0 before the frozen window; CRIU, runc and the threads started after
//! that inherit nice 0. Only where it can be raised back (CAP_SYS_NICE):
//! a thread stuck at nice 10 in a frozen window would be worse.

/// `CAP_SYS_NICE`'s bit in the capability sets.
const CAP_SYS_NICE: u32 = 23;

/// The calling thread's priority, lowered while the returned guard is in
/// the background; back to normal at [`Background::foreground`] or drop.
pub struct Background {
    lowered: bool,
}

impl Background {
    /// Lowers the calling thread's priority, if it can be raised back.
    pub fn enter() -> Self {
        let can_raise = crate::rlimit_support::effective_caps().is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0);
        Self { lowered: can_raise && set_thread_nice(10) }
    }

    /// Back to nice 0 (idempotent).
    pub fn foreground(&mut self) {
        if std::mem::take(&mut self.lowered) {
            set_thread_nice(0);
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.foreground();
    }
}

/// Sets the calling thread's nice value (on Linux, PRIO_PROCESS with a
/// thread id names that thread alone).
fn set_thread_nice(nice: i32) -> bool {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; it fails (returns -1) rather than misbehaves on bad input.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> i64 {
        let tid = nix::unistd::gettid().as_raw();
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Field 19 (nice), counted after the command's closing parenthesis.
        stat.rsplit_once(") ").unwrap().1.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn a_background_thread_comes_back_to_the_foreground() {
        std::thread::spawn(|| {
            let mut bg = Background::enter();
            if bg.lowered {
                assert_eq!(own_nice(), 10);
            }
            bg.foreground();
            assert_eq!(own_nice(), 0);
            drop(Background::enter());
            assert_eq!(own_nice(), 0, "dropped in the background, the thread is back to normal");
        })
        .join()
        .unwrap();
    }
}
