//! Everything Unix-specific about owning processes: spawning into a fresh process group with the
//! parent-death signal, signalling whole groups, and reaping orphans the subreaper adopts.

use std::collections::HashSet;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// What to run for one daemon or job.
pub(crate) struct SpawnSpec<'a> {
    pub program: &'a std::path::Path,
    pub args: &'a [String],
    pub cwd: &'a std::path::Path,
    pub env: Vec<(String, String)>,
    /// A descriptor the child inherits under the same number (its connection to the supervisor);
    /// every other descriptor above 2 is closed at exec.
    pub pass_fd: Option<std::os::fd::RawFd>,
    /// The open `cgroup.procs` of the cgroup the child must run in: the child writes "0" to it
    /// (moving itself) before exec.
    pub cgroup_procs: Option<std::os::fd::RawFd>,
}

/// Spawns a child in its own process group (pgid = its pid), with stdin closed, stdout and stderr piped,
/// SIGKILL as its parent-death signal, in its cgroup (when `cgroup_procs` is set), and with no
/// descriptor but 0, 1, 2 and `pass_fd`.
///
/// Entering the cgroup from the child (rather than clone3's CLONE_INTO_CGROUP, which std cannot
/// use) happens before exec, so the program's first instruction already runs contained. A failed
/// write is not fatal here: the caller checks /proc/<pid>/cgroup and falls back (containment.rs).
///
/// Must be called from the supervisor's main thread: the parent-death signal fires when the *thread*
/// that forked exits, and the main thread lives as long as the supervisor.
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Child> {
    let parent = std::process::id() as i32;
    let pass_fd = spec.pass_fd;
    let cgroup_procs = spec.cgroup_procs;
    let mut cmd = Command::new(spec.program);
    cmd.args(spec.args)
        .current_dir(spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    // SAFETY: only async-signal-safe calls (write, close_range/fcntl, prctl, getppid, _exit) run
    // between fork and exec, on values prepared before the fork; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_procs {
                // "0" moves the writing process (cgroup-v2.rst, "cgroup.procs"); errors are
                // detected by the parent, see above.
                let _ = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            // Nothing the supervisor holds (or inherited) leaks into the child: every descriptor
            // above 2 becomes close-on-exec. Not closed here: std still needs its own error pipe
            // until exec succeeds.
            cloexec_from(3);
            // The passed descriptor: in the child only, clear the flag so that exec keeps it,
            // under its number (which the environment names).
            if let Some(fd) = pass_fd
                && nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc_prctl_pdeathsig() != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl: then nobody would kill us later.
            if nix::unistd::getppid().as_raw() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Marks every descriptor from `first` up close-on-exec: close_range(CLOSE_RANGE_CLOEXEC)
/// (Linux 5.11), else fcntl on each up to the descriptor limit. Async-signal-safe.
pub(crate) fn cloexec_from(first: u32) {
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        if nix::libc::syscall(
            nix::libc::SYS_close_range,
            first,
            u32::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let max = nix::libc::sysconf(nix::libc::_SC_OPEN_MAX);
        let max = if max > 0 {
            max.min(1 << 20) as i32
        } else {
            1024
        };
        for fd in first as i32..max {
            nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
        }
    }
}

/// Closes every descriptor from 3 up that this process inherited: the supervisor calls it first
/// thing, so nothing its caller held open (a pipe to `| cat`, an ssh channel) stays open in it.
pub(crate) fn close_inherited() {
    // SAFETY: plain system call; nothing in this process uses a descriptor above 2 yet.
    let done = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if done == 0 {
        return;
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor nothing in this process owns (the directory handle used
        // for the listing is closed already; closing it twice is a harmless EBADF).
        unsafe {
            nix::libc::close(fd);
        }
    }
}

fn libc_prctl_pdeathsig() -> i32 {
    // SAFETY: plain prctl call with integer arguments.
    unsafe {
        nix::libc::prctl(
            nix::libc::PR_SET_PDEATHSIG,
            nix::libc::SIGKILL as nix::libc::c_ulong,
            0,
            0,
            0,
        )
    }
}

/// Sends `sig` to every process of the group. Returns false when the group no longer exists.
pub(crate) fn signal_group(pgid: u32, sig: Signal) -> bool {
    !matches!(killpg(Pid::from_raw(pgid as i32), sig), Err(Errno::ESRCH))
}

/// Makes this process the reaper of orphaned descendants.
pub(crate) fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// "exit 0", "exit 3", "killed by SIGKILL".
pub(crate) fn describe_exit(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        "ended".to_string()
    }
}

/// Pids the supervisor waits for itself (daemons, jobs); the orphan reaper leaves those alone so it
/// never steals an exit status from tokio.
#[derive(Clone, Default)]
pub(crate) struct OwnedPids(Arc<Mutex<HashSet<u32>>>);

impl OwnedPids {
    pub fn insert(&self, pid: u32) {
        self.0.lock().expect("owned pids lock").insert(pid);
    }
    pub fn remove(&self, pid: u32) {
        self.0.lock().expect("owned pids lock").remove(&pid);
    }
    fn contains(&self, pid: u32) -> bool {
        self.0.lock().expect("owned pids lock").contains(&pid)
    }
}

/// Reaps adopted orphans, by pid: lists this process's children from /proc and waits (without
/// blocking) only for those the supervisor did not spawn itself. Returns the pids reaped.
pub(crate) fn reap_orphans(owned: &OwnedPids) -> Vec<u32> {
    let mut reaped = Vec::new();
    for pid in children_of_self() {
        if owned.contains(pid) {
            continue;
        }
        if let Ok(status) = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG))
            && !matches!(status, WaitStatus::StillAlive)
        {
            reaped.push(pid);
        }
    }
    reaped
}

/// Direct children of this process: /proc/self/task/*/children, or a /proc scan where that file is
/// missing (kernels without CONFIG_PROC_CHILDREN).
pub(crate) fn children_of_self() -> Vec<u32> {
    let mut out = Vec::new();
    let mut found_file = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                found_file = true;
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    if found_file {
        return out;
    }
    let me = std::process::id();
    out.extend(
        ringrift::procfs::pids()
            .into_iter()
            .filter(|&pid| ringrift::procfs::stat(pid).is_some_and(|s| s.ppid == me)),
    );
    out
}
