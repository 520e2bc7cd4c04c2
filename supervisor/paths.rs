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

/// Why the root's lock was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    #[error("cannot open {root}: {source}")]
    Open { root: PathBuf, source: io::Error },
    #[error("cannot stat {root}: {source}")]
    Stat { root: PathBuf, source: io::Error },
    /// Another process holds the lock: `holder` is its pid when /proc/locks or the pid file says.
    #[error(
        "another supervisor{} is already running on {root}; use `ringrift-supervisor status` to talk to it",
        .holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { root: PathBuf, holder: Option<u32> },
    #[error("cannot lock {root}: {source}")]
    Lock {
        root: PathBuf,
        source: nix::errno::Errno,
    },
}

/// Takes the root's exclusive lock (on the root directory; the descriptor is close-on-exec, so no
/// child inherits it), or says which supervisor holds it.
pub(crate) fn lock_root(paths: &Paths) -> Result<RootLock, LockError> {
    let root = || paths.root.clone();
    let dir = fs::File::open(&paths.root).map_err(|source| LockError::Open {
        root: root(),
        source,
    })?;
    let id = dir
        .metadata()
        .map(|m| (m.dev(), m.ino()))
        .map_err(|source| LockError::Stat {
            root: root(),
            source,
        })?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(RootLock { _lock: lock }),
        Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let holder = ringrift::procfs::flock_holder(id.0, id.1).or_else(|| {
                fs::read_to_string(&paths.pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            });
            Err(LockError::Held {
                root: root(),
                holder,
            })
        }
        Err((_, source)) => Err(LockError::Lock {
            root: root(),
            source,
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_root_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let _held = lock_root(&paths).unwrap();
        // flock belongs to the open file: a second open in this process is refused like another
        // supervisor would be, and /proc/locks names this process.
        let e = lock_root(&paths).err().unwrap();
        let me = std::process::id();
        assert!(
            matches!(&e, LockError::Held { root, holder: Some(p) } if *root == paths.root && *p == me),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "another supervisor (pid {me}) is already running on {}; use `ringrift-supervisor \
                 status` to talk to it",
                paths.root.display()
            )
        );
        let gone = Paths::new(&dir.path().join("gone"));
        let e = lock_root(&gone).err().unwrap();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot open {}: ", gone.root.display())),
            "{e}"
        );
    }
}
