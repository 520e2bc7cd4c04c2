//! Where everything lives under a root, and the one-supervisor-per-root lock.
//!
//! The lock is an exclusive `flock(2)` on the root directory itself, not on a file in run/: a file
//! can be deleted (`rm -rf run/`) while its lock is held, after which a second supervisor would
//! lock a fresh file and share the root. The directory cannot go away while it is the root.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub boot_log: PathBuf,
    pub logs_dir: PathBuf,
    pub master_log: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Paths {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let run_dir = root.join("run");
        let logs_dir = root.join("logs");
        Paths {
            socket: run_dir.join("supervisor.sock"),
            pid_file: run_dir.join("supervisor.pid"),
            boot_log: run_dir.join("supervisor.stderr"),
            master_log: logs_dir.join("master_loop.log"),
            run_dir,
            logs_dir,
            root,
        }
    }

    pub fn daemon_log(&self, name: &str) -> PathBuf {
        self.logs_dir.join(format!("{name}.log"))
    }

    /// Creates run/ with mode 0700 (tightening it if it already exists) and logs/.
    pub fn prepare_dirs(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run_dir)?;
        fs::set_permissions(&self.run_dir, fs::Permissions::from_mode(0o700))?;
        fs::create_dir_all(&self.logs_dir)?;
        Ok(())
    }
}

/// Held for the supervisor's whole life; dropping it releases the root.
pub(crate) struct RootLock {
    _lock: Flock<fs::File>,
}

/// Takes the root's exclusive lock (on the root directory; the descriptor is close-on-exec, so no
/// child inherits it), or says which supervisor holds it.
pub(crate) fn lock_root(paths: &Paths) -> Result<RootLock, String> {
    let dir = fs::File::open(&paths.root)
        .map_err(|e| format!("cannot open {}: {e}", paths.root.display()))?;
    let id = dir
        .metadata()
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| format!("cannot stat {}: {e}", paths.root.display()))?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(RootLock { _lock: lock }),
        Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let holder = lock_holder(id).or_else(|| {
                fs::read_to_string(&paths.pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            });
            Err(format!(
                "another supervisor{} is already running on {}; use `ringrift-supervisor status` to talk to it",
                holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                paths.root.display(),
            ))
        }
        Err((_, errno)) => Err(format!("cannot lock {}: {errno}", paths.root.display())),
    }
}

/// The pid holding a flock on the file (dev, ino), from /proc/locks (proc(5)): lines such as
/// `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`, the device as hex `major:minor`.
fn lock_holder((dev, ino): (u64, u64)) -> Option<u32> {
    let text = fs::read_to_string("/proc/locks").ok()?;
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let i = fields.iter().position(|f| *f == "FLOCK")?;
        let pid: u32 = fields.get(i + 3)?.parse().ok()?;
        let mut id = fields.get(i + 4)?.split(':');
        let (ma, mi, n) = (id.next()?, id.next()?, id.next()?);
        (u64::from_str_radix(ma, 16).ok()? == major
            && u64::from_str_radix(mi, 16).ok()? == minor
            && n.parse::<u64>().ok()? == ino)
            .then_some(pid)
    })
}

/// The (device, inode) of a path, if it exists: how the supervisor recognises its own socket.
pub(crate) fn file_id(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Writes run/supervisor.pid. Only called with the lock held, so a stale file is simply replaced.
pub(crate) fn write_pid_file(paths: &Paths) -> io::Result<()> {
    let tmp = paths.pid_file.with_extension("pid.tmp");
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{}", std::process::id())?;
    fs::rename(tmp, &paths.pid_file)
}
