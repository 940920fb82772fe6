//! SIGINT and SIGTERM during a migration.
//!
//! The signals are blocked in every thread and taken by one thread with
//! sigwait. Before the sender has a connection, a signal ends the process at
//! once (nothing is touched yet); after, it shuts the connection down, which
//! makes the blocked step fail and the sender roll back as for any other
//! failure, and report it.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};

/// What a signal does to the migration under way: cut its connection.
type Cut = Box<dyn Fn() + Send>;

static CONNECTION: Mutex<Option<Cut>> = Mutex::new(None);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
        match CONNECTION.lock().unwrap().as_ref() {
            Some(cut) => {
                eprintln!("ctmigrate: {sig:?}: stopping the migration and rolling back");
                cut();
            }
            None => std::process::exit(130),
        }
    });
}

/// The connection a signal should cut.
pub fn register(conn: &TcpStream) {
    if let Ok(c) = conn.try_clone() {
        register_cut(move || {
            let _ = c.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// What to do to cut the connection, where it is not a socket (an `ssh`
/// child to stop, say).
pub fn register_cut(cut: impl Fn() + Send + 'static) {
    *CONNECTION.lock().unwrap() = Some(Box::new(cut));
}

pub fn unregister() {
    *CONNECTION.lock().unwrap() = None;
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
