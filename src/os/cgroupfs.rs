//! Reading and acting on cgroup v2 files: where the hierarchy is mounted, which cgroup a process
//! is in, and the files that list, kill, freeze and remove a cgroup (the kernel's cgroup-v2.rst).
//! Shared by the supervisor (which owns a subtree per root) and the reaper (which cleans up the
//! subtree of a supervisor that died). Linux only; no state.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file in run/ where the supervisor records the cgroup subtree it owns (one line: the path).
pub const RECORD_FILE: &str = "cgroup";

/// The mount point of the cgroup2 file system, from the text of /proc/self/mountinfo.
pub fn parse_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw,..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The v2 cgroup path of a process, from the text of `/proc/<pid>/cgroup` (the `0::` line).
pub fn parse_own(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_end_matches(" (deleted)").to_string())
}

/// Why the calling process's cgroup v2 directory cannot be found (see [`own_dir`]).
#[derive(Debug, thiserror::Error)]
pub enum OwnDirError {
    /// /proc/self/mountinfo or /proc/self/cgroup (`path`) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The /proc file.
        path: &'static str,
        /// Why it could not be read.
        source: io::Error,
    },
    /// No mount of type cgroup2 in /proc/self/mountinfo.
    #[error("no cgroup2 file system is mounted")]
    NoMount,
    /// /proc/self/cgroup has only cgroup v1 lines.
    #[error("/proc/self/cgroup has no cgroup v2 (0::) line")]
    NoV2Line,
}

/// The directory of the calling process's own cgroup: the cgroup2 mount (/proc/self/mountinfo)
/// joined with the `0::` path of /proc/self/cgroup.
pub fn own_dir() -> Result<PathBuf, OwnDirError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| OwnDirError::Read { path, source })
    };
    let mount = parse_mount(&read("/proc/self/mountinfo")?).ok_or(OwnDirError::NoMount)?;
    let own = parse_own(&read("/proc/self/cgroup")?).ok_or(OwnDirError::NoV2Line)?;
    let own = own.trim_matches('/');
    Ok(if own.is_empty() {
        mount
    } else {
        mount.join(own)
    })
}

/// `ringrift-<hash>`: the subtree's name for a root (FNV-1a of the path, 64 bits).
pub fn subtree_name(root: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in root.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ringrift-{h:016x}")
}

/// Pids in a cgroup (not its descendants').
pub fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True while a process is left in the cgroup or a descendant (`populated 1` in cgroup.events).
/// A cgroup that no longer exists is empty.
pub fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// SIGKILL to every process of the cgroup and its descendants, at once (cgroup.kill, Linux 5.14).
pub fn kill(dir: &Path) -> io::Result<()> {
    write_file(&dir.join("cgroup.kill"), "1")
}

/// Freezes or thaws the whole cgroup (cgroup.freeze, Linux 5.2).
pub fn freeze(dir: &Path, frozen: bool) -> io::Result<()> {
    write_file(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

/// The cgroup a process is in, as a directory under the mount, if it can be read.
pub fn of_pid(pid: u32) -> Option<String> {
    parse_own(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// Kills everything in a cgroup tree (thawing it first, so nothing waits frozen).
pub fn kill_tree(dir: &Path) {
    let _ = freeze(dir, false);
    if kill(dir).is_err() {
        // No cgroup.kill: SIGKILL each process we can see, depth first.
        for pid in procs(dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A cgroup directory that could not be removed: `cannot remove <dir>: <why>`.
#[derive(Debug, thiserror::Error)]
#[error("cannot remove {dir}: {source}")]
pub struct RemoveError {
    /// The cgroup asked to be removed (the top of the tree for [`remove_tree`]).
    pub dir: PathBuf,
    /// Why: the first failure met (EBUSY while a process is left in it, EACCES, ...).
    pub source: io::Error,
}

/// Removes a cgroup and its descendants, deepest first, waiting up to `wait` for them to empty.
/// Err names the cgroup and the first failure (a directory that cannot be listed or removed).
pub fn remove_tree(dir: &Path, wait: Duration) -> Result<(), RemoveError> {
    let deadline = Instant::now() + wait;
    while populated(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    fn rm(dir: &Path) -> io::Result<()> {
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rm(&e.path())?;
            }
        }
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    rm(dir).map_err(|source| RemoveError {
        dir: dir.to_path_buf(),
        source,
    })
}

/// Removes one empty cgroup (no descendants). Ok when it is gone.
pub fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The space-separated words of a cgroup file such as `cgroup.controllers` or
/// `cgroup.subtree_control` (controller names: `cpu`, `memory`, …); empty when it cannot be read.
pub fn read_set(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// One write(2) of the whole text, as cgroup files require.
pub fn write_file(path: &Path, text: &str) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "24 1 0:22 / /sys rw - sysfs sysfs rw\n\
             31 24 0:27 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
             42 31 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            parse_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let odd = "30 24 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_mount(odd), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(parse_mount("24 1 0:22 / /sys rw - sysfs sysfs rw\n"), None);
    }

    #[test]
    fn reads_the_v2_line_of_proc_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/\n";
        assert_eq!(parse_own(hybrid).as_deref(), Some("/"));
        let unit = "0::/system.slice/ringrift.service\n";
        assert_eq!(
            parse_own(unit).as_deref(),
            Some("/system.slice/ringrift.service")
        );
        assert_eq!(parse_own("4:memory:/x\n"), None);
    }

    #[test]
    fn subtree_names_are_stable_per_root() {
        let a = subtree_name(Path::new("/srv/a"));
        assert_eq!(a, subtree_name(Path::new("/srv/a")));
        assert_ne!(a, subtree_name(Path::new("/srv/b")));
        assert!(a.starts_with("ringrift-") && a.len() == "ringrift-".len() + 16);
    }

    #[test]
    fn remove_errors_name_the_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let e = remove_tree(&file, Duration::ZERO).unwrap_err();
        assert_eq!(e.dir, file);
        assert_eq!(
            e.to_string(),
            format!("cannot remove {}: {}", file.display(), e.source)
        );
    }
}
