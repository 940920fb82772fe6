//! SIGINT and SIGTERM during a migration.
//!
//! The signals are blocked in every thread and taken by one thread with
//! sigwait. With no connection registered, a signal ends a sender at once
//! (nothing is touched yet; exit 130). Otherwise it cuts every registered
//! connection (a receiver serves several at once; a sender has one), which
//! makes each blocked step fail and each migration roll back as for any
//! other failure, and report it.
//!
//! A listening receiver ([`stop_cleanly`]) is never ended from here: the
//! signal cuts what is in flight and sets [`interrupted`], its accept loop
//! stops taking connections, waits for every migration's rollback (or its
//! end, for one past the Commit) and the receiver exits 0 (a service's
//! clean stop).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};

/// What a signal does to one migration under way: cut its connection.
type Cut = Box<dyn Fn() + Send>;

/// The connections a signal cuts, by registration key: a sender's (one
/// per migration; an evacuation has several) and a receiver's.
static CONNECTIONS: Mutex<BTreeMap<u64, Cut>> = Mutex::new(BTreeMap::new());
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// False once [`stop_cleanly`] was called: an idle process is not ended by
/// the signal thread.
static EXIT_WHEN_IDLE: AtomicBool = AtomicBool::new(true);

/// The process stops by itself after a signal (a listening receiver polls
/// [`interrupted`]): the signal thread then never exits it, even with no
/// connection registered.
pub fn stop_cleanly() {
    EXIT_WHEN_IDLE.store(false, Ordering::SeqCst);
}

/// Call first thing in the process, before any other thread exists.
pub fn install() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || loop {
        let Ok(sig) = set.wait() else { return };
        INTERRUPTED.store(true, Ordering::SeqCst);
        let connections = CONNECTIONS.lock().unwrap();
        if connections.is_empty() {
            if EXIT_WHEN_IDLE.load(Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("ctmigrate: {sig:?}: stopping (no migration in flight)");
            continue;
        }
        eprintln!("ctmigrate: {sig:?}: stopping: cutting {} connection(s) in flight, each migration rolls back", connections.len());
        for cut in connections.values() {
            cut();
        }
    });
}

fn shutdown_cut(conn: &TcpStream) -> Option<Cut> {
    let c = conn.try_clone().ok()?;
    Some(Box::new(move || {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }))
}

/// What to do to cut a migration's connection, where it is not a socket
/// (an `ssh` child to stop, say); unregistered when the returned
/// registration is dropped.
pub fn register_cut(cut: impl Fn() + Send + 'static) -> Registration {
    register_boxed(Box::new(cut))
}

/// One of several connections a signal cuts (a receiver's); unregistered
/// when dropped.
pub struct Registration(Option<u64>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(key) = self.0 {
            CONNECTIONS.lock().unwrap().remove(&key);
        }
    }
}

/// Adds `conn` to the connections a signal cuts, until the returned
/// registration is dropped. A connection registered after a signal came
/// is cut at once.
pub fn register_connection(conn: &TcpStream) -> Registration {
    match shutdown_cut(conn) {
        Some(cut) => register_boxed(cut),
        None => Registration(None),
    }
}

fn register_boxed(cut: Cut) -> Registration {
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    CONNECTIONS.lock().unwrap().insert(key, cut);
    // The signal thread sets the flag before it takes the lock: checked
    // after our insert, a signal is never missed.
    if interrupted() {
        if let Some(cut) = CONNECTIONS.lock().unwrap().get(&key) {
            cut();
        }
    }
    Registration(Some(key))
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
