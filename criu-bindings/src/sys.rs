//! The few raw process-level operations the session needs: a socketpair and
//! placing its far end at a fixed descriptor number in the CRIU child.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// The descriptor number at which `criu swrk` finds its RPC socket.
pub const SWRK_FD: i32 = 3;

/// A close-on-exec SEQPACKET socketpair: (our end, CRIU's end).
pub fn seqpacket_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// A close-on-exec stream socketpair for CRIU's page-server protocol:
/// (our end, CRIU's end). CRIU's send buffer is raised to `send_buffer`
/// bytes (as root, past the system's default limit) so that it can splice
/// a few page pipes ahead of our reads instead of waiting on each.
pub fn page_server_socketpair(send_buffer: usize) -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{setsockopt, sockopt};
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)?;
    if setsockopt(&theirs, sockopt::SndBufForce, &send_buffer).is_err() {
        // Not root: the default limit, still correct, just more wake-ups.
        let _ = setsockopt(&theirs, sockopt::SndBuf, &send_buffer);
    }
    Ok((ours, theirs))
}

/// Arranges for `fds[i].1` to be open at descriptor `fds[i].0` in the child
/// (and for nothing else of ours to leak into it, since every descriptor we
/// create is close-on-exec).
pub fn map_fds_in_child(cmd: &mut Command, fds: Vec<(i32, OwnedFd)>) {
    let raw: Vec<(i32, i32)> = fds.iter().map(|(to, fd)| (*to, fd.as_raw_fd())).collect();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // dup2/fcntl, which are async-signal-safe; it allocates nothing. The
    // OwnedFds it refers to are kept alive by moving them into the closure.
    // Sources are first moved above the highest target so that a target
    // number never overwrites a source that is still to be placed.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_alive = &fds;
            let base = raw.iter().map(|(to, _)| *to).max().unwrap_or(0) + 1;
            let mut moved = [0i32; 16];
            for (i, (_, from)) in raw.iter().enumerate().take(16) {
                let n = libc_fcntl_dupfd(*from, base)?;
                moved[i] = n;
            }
            for (i, (to, _)) in raw.iter().enumerate().take(16) {
                if nix::libc::dup2(moved[i], *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn libc_fcntl_dupfd(fd: i32, min: i32) -> std::io::Result<i32> {
    // SAFETY: F_DUPFD_CLOEXEC only duplicates a descriptor; the result is
    // checked. The copy is close-on-exec so only the dup2 target survives exec.
    let n = unsafe { nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, min) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n)
    }
}
