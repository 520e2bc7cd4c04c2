//! Where everything lives under a root, and the one-supervisor-per-root lock.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub lock_file: PathBuf,
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
            lock_file: run_dir.join("lock"),
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

/// Takes the root's exclusive lock, or says which supervisor holds it.
pub(crate) fn lock_root(paths: &Paths) -> Result<RootLock, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&paths.lock_file)
        .map_err(|e| format!("cannot open {}: {e}", paths.lock_file.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(RootLock { _lock: lock }),
        Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let holder = fs::read_to_string(&paths.pid_file)
                .ok()
                .map(|s| s.trim().to_string());
            Err(format!(
                "another supervisor{} is already running on {} (lock {} is held); use `ringrift-supervisor status` to talk to it",
                holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                paths.root.display(),
                paths.lock_file.display()
            ))
        }
        Err((_, errno)) => Err(format!(
            "cannot lock {}: {errno}",
            paths.lock_file.display()
        )),
    }
}

/// Writes run/supervisor.pid. Only called with the lock held, so a stale file is simply replaced.
pub(crate) fn write_pid_file(paths: &Paths) -> io::Result<()> {
    let tmp = paths.pid_file.with_extension("pid.tmp");
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{}", std::process::id())?;
    fs::rename(tmp, &paths.pid_file)
}
