//! One `criu swrk` process and the request/notify loop spoken with it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{recv, send, MsgFlags};
use prost::Message;

use crate::options::{DumpOptions, RestoreOptions};
use crate::rpc::{CriuFeatures as RpcFeatures, CriuOpts, CriuReq, CriuReqType, CriuResp};
use crate::{sys, CriuError, CriuFeatures, CriuVersion};

/// Largest RPC message CRIU sends; its answers are a few hundred bytes.
const MAX_MESSAGE: usize = 256 * 1024;

/// A notification CRIU sends in the middle of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The hook point, e.g. `pre-dump`, `post-dump`, `setup-namespaces`,
    /// `post-restore`, `network-lock`, `network-unlock`.
    pub script: String,
    /// For restore notifications, the pid of the restored root task.
    pub pid: i32,
}

/// What a notification handler tells CRIU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAction {
    Continue,
    /// Make CRIU fail the request, giving this reason to the caller.
    Abort(String),
}

/// A running `criu swrk` with its RPC socket. Several requests can be sent
/// in turn (pre-dumps followed by the final dump).
pub struct CriuSession {
    child: Option<Child>,
    socket: OwnedFd,
    /// Inode of CRIU's end of the RPC socket: a CRIU process that still
    /// holds it after `criu swrk` itself died (a forked helper) keeps our
    /// reads from ever seeing end of file, and is found by it.
    peer_inode: u64,
}

/// How often a read of CRIU's answer checks that CRIU is still alive.
const LIVENESS_POLL_MS: u16 = 200;

impl CriuSession {
    /// Starts `BINARY swrk 3` with the RPC socket at descriptor 3.
    pub fn start(binary: &Path) -> Result<Self, CriuError> {
        Self::start_with_fds(binary, Vec::new())
    }

    /// Like [`start`](Self::start), also placing each `(number, fd)` of
    /// `extra_fds` at that descriptor number in CRIU, for `inherit_fd`.
    pub fn start_with_fds(
        binary: &Path,
        extra_fds: Vec<(i32, OwnedFd)>,
    ) -> Result<Self, CriuError> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let peer_inode = nix::sys::stat::fstat(theirs.as_raw_fd())?.st_ino;
        let mut cmd = Command::new(binary);
        cmd.arg("swrk")
            .arg(sys::SWRK_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut fds = vec![(sys::SWRK_FD, theirs)];
        fds.extend(extra_fds);
        sys::map_fds_in_child(&mut cmd, fds);
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        // `cmd` (and with it CRIU's end of the socket) is dropped here, so
        // that our reads see EOF if CRIU dies.
        drop(cmd);
        Ok(Self {
            child: Some(child),
            socket: ours,
            peer_inode,
        })
    }

    /// Process id of the `criu swrk` child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends one request and serves its notifications until the final answer.
    pub fn request(
        &mut self,
        req: &CriuReq,
        on_notify: &mut dyn FnMut(&Notification) -> NotifyAction,
    ) -> Result<CriuResp, CriuError> {
        let expected = req.r#type();
        self.send(req)?;
        let mut rejection: Option<(String, String)> = None;
        loop {
            let resp = self.receive()?;
            if resp.r#type() == CriuReqType::Notify {
                let note = resp.notify.clone().unwrap_or_default();
                let notification = Notification {
                    script: note.script.unwrap_or_default(),
                    pid: note.pid.unwrap_or(0),
                };
                let ok = match on_notify(&notification) {
                    NotifyAction::Continue => true,
                    NotifyAction::Abort(reason) => {
                        rejection = Some((notification.script.clone(), reason));
                        false
                    }
                };
                self.send(&CriuReq {
                    r#type: CriuReqType::Notify as i32,
                    notify_success: Some(ok),
                    ..Default::default()
                })?;
                continue;
            }
            if let Some((script, reason)) = rejection {
                return Err(CriuError::NotifyRejected { script, reason });
            }
            if !resp.success {
                return Err(CriuError::Failed {
                    request: expected,
                    errno: resp.cr_errno.unwrap_or(0),
                    message: resp.cr_errmsg.clone().filter(|m| !m.is_empty()),
                });
            }
            if resp.r#type() != expected {
                return Err(CriuError::UnexpectedResponse {
                    expected,
                    got: resp.r#type(),
                });
            }
            return Ok(resp);
        }
    }

    /// Final dump (or, with `opts.pre_dump`, one pre-dump round). Tasks are
    /// left as `opts.leave_running` says.
    pub fn dump(
        &mut self,
        opts: &DumpOptions,
        on_notify: &mut dyn FnMut(&Notification) -> NotifyAction,
    ) -> Result<(), CriuError> {
        let work_dir = open_dir(opts.work_dir.as_deref())?;
        let rpc_opts = opts.to_rpc(work_dir.as_ref().map(|f| f.as_raw_fd()));
        let kind = if opts.pre_dump {
            CriuReqType::PreDump
        } else {
            CriuReqType::Dump
        };
        let req = CriuReq {
            r#type: kind as i32,
            opts: Some(rpc_opts),
            ..Default::default()
        };
        self.request(&req, on_notify)?;
        Ok(())
    }

    /// Restores from `opts.images_dir`; returns the restored root task's pid.
    pub fn restore(
        &mut self,
        opts: &RestoreOptions,
        on_notify: &mut dyn FnMut(&Notification) -> NotifyAction,
    ) -> Result<i32, CriuError> {
        let work_dir = open_dir(opts.work_dir.as_deref())?;
        let req = CriuReq {
            r#type: CriuReqType::Restore as i32,
            opts: Some(opts.to_rpc(work_dir.as_ref().map(|f| f.as_raw_fd()))),
            ..Default::default()
        };
        let resp = self.request(&req, on_notify)?;
        Ok(resp.restore.map(|r| r.pid).unwrap_or(0))
    }

    /// Closes the socket and waits for CRIU to exit.
    pub fn finish(mut self) -> Result<(), CriuError> {
        self.close_and_wait()
    }

    /// Like [`finish`](Self::finish) after a successful PRE_DUMP: CRIU then
    /// waits for a further request and exits non-zero when the socket
    /// closes instead, which is not a failure.
    pub fn finish_after_pre_dump(mut self) -> Result<(), CriuError> {
        match self.close_and_wait() {
            Err(CriuError::Exited(_)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn close_and_wait(&mut self) -> Result<(), CriuError> {
        let _ = nix::sys::socket::shutdown(
            self.socket.as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(mut child) = self.child.take() {
            let status = child.wait()?;
            if !status.success() {
                return Err(CriuError::Exited(status));
            }
        }
        Ok(())
    }

    fn send(&self, req: &CriuReq) -> Result<(), CriuError> {
        let buf = req.encode_to_vec();
        send(self.socket.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL)?;
        Ok(())
    }

    /// Whether `criu swrk` has exited (a zombie counts: it is not reaped
    /// until the session ends).
    fn criu_gone(&self) -> bool {
        let Some(pid) = self.pid() else { return true };
        // Not alive: a zombie, dead, or its stat unreadable (gone).
        !procfs::process::Process::new(pid as i32).is_ok_and(|p| p.is_alive())
    }

    /// Kills every process still holding CRIU's end of the RPC socket:
    /// helpers of a `criu swrk` that died, which would otherwise keep it
    /// open (and the container's tasks seized) for ever.
    fn kill_orphaned_helpers(&self) -> Vec<i32> {
        use procfs::process::FDTarget;
        let mut killed = Vec::new();
        let Ok(procs) = procfs::process::all_processes() else { return killed };
        for p in procs.flatten() {
            let pid = p.pid;
            if pid == std::process::id() as i32 {
                continue;
            }
            let Ok(fds) = p.fd() else { continue };
            let holds = fds.flatten().any(|fd| matches!(fd.target, FDTarget::Socket(inode) if inode == self.peer_inode));
            if holds {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                killed.push(pid);
            }
        }
        killed
    }

    fn receive(&self) -> Result<CriuResp, CriuError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        // Wait for the answer, checking meanwhile that CRIU lives: if it
        // was killed, a helper it forked may hold the socket open.
        loop {
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(LIVENESS_POLL_MS)) {
                Ok(0) if self.criu_gone() => {
                    let helpers = self.kill_orphaned_helpers();
                    return Err(CriuError::Died { pid: self.pid().unwrap_or(0), helpers });
                }
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = loop {
            match recv(self.socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Err(nix::Error::EINTR) => continue,
                other => break other?,
            }
        };
        if n == 0 {
            return Err(CriuError::UnexpectedEof);
        }
        Ok(CriuResp::decode(&buf[..n])?)
    }
}

impl Drop for CriuSession {
    fn drop(&mut self) {
        // CRIU sees the socket close and ends its request; wait so that no
        // zombie and no half-finished dump outlive us.
        let _ = self.close_and_wait();
    }
}

fn open_dir(path: Option<&Path>) -> Result<Option<File>, CriuError> {
    Ok(match path {
        Some(p) => Some(File::open(p)?),
        None => None,
    })
}

/// One request to a fresh `criu swrk`, which then exits.
fn one_request(binary: &Path, req: &CriuReq) -> Result<CriuResp, CriuError> {
    let mut s = CriuSession::start(binary)?;
    let resp = s.request(req, &mut |_| NotifyAction::Continue)?;
    s.finish()?;
    Ok(resp)
}

/// Asks CRIU for its version.
pub fn version(binary: &Path) -> Result<CriuVersion, CriuError> {
    let resp = one_request(
        binary,
        &CriuReq {
            r#type: CriuReqType::Version as i32,
            ..Default::default()
        },
    )?;
    let v = resp.version.unwrap_or_default();
    Ok(CriuVersion {
        major: v.major_number.max(0) as u32,
        minor: v.minor_number.max(0) as u32,
        sublevel: v.sublevel.unwrap_or(0).max(0) as u32,
    })
}

/// Asks CRIU which of the features it knows of work on this kernel.
pub fn feature_check(binary: &Path) -> Result<CriuFeatures, CriuError> {
    let resp = one_request(
        binary,
        &CriuReq {
            r#type: CriuReqType::FeatureCheck as i32,
            features: Some(RpcFeatures {
                mem_track: Some(true),
                lazy_pages: Some(true),
                pidfd_store: Some(true),
            }),
            // FEATURE_CHECK needs options present even though none apply.
            opts: Some(CriuOpts::default()),
            ..Default::default()
        },
    )?;
    let f = resp.features.unwrap_or_default();
    Ok(CriuFeatures {
        mem_track: f.mem_track.unwrap_or(false),
        lazy_pages: f.lazy_pages.unwrap_or(false),
        pidfd_store: f.pidfd_store.unwrap_or(false),
    })
}

/// The CRIU binary to use: `$CTMIGRATE_CRIU`, else `criu` on PATH.
pub fn default_binary() -> PathBuf {
    std::env::var_os("CTMIGRATE_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("criu"))
}
