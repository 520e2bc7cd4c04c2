//! The cgroup v2 subtree the supervisor owns: finding the hierarchy, making the subtree, one cgroup
//! per daemon and job, and the files that act on them (`cgroup.procs`, `cgroup.kill`,
//! `cgroup.freeze`, `cgroup.events`, `memory.max`, `cpu.max`).
//!
//! Layout, under the supervisor's own cgroup (from `/proc/self/cgroup`, the `0::` line) in the v2
//! mount (from `/proc/self/mountinfo`, type `cgroup2`):
//!
//! ```text
//! <mount><own cgroup>/ringrift-<16 hex digits of the root's hash>/
//!     supervisor/        the supervisor itself, only when it had to leave its own cgroup (below)
//!     daemon-<name>/     one per daemon, made at spawn, removed once empty
//!     job-<id>/          one per job
//! ```
//!
//! Rules from the kernel's cgroup-v2.rst that shape it:
//! - A process may be moved only by a writer of `cgroup.procs` of the common ancestor of its old
//!   and new cgroup: children are moved from the supervisor's own cgroup into a descendant of it.
//! - "No internal processes": a non-root cgroup with processes cannot enable controllers for its
//!   children. To enable `memory`/`cpu` below its own cgroup, the supervisor first moves itself into
//!   the leaf `supervisor/` (and back out at exit, so the subtree can be removed).
//! - One subtree per root (the root's lock makes the supervisor unique): a subtree found at start-up
//!   belongs to an earlier supervisor of this root that did not clean up; it is killed and removed.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringrift::limits::Limits;

/// The controllers whose limits the supervisor can set.
const WANTED_CONTROLLERS: [&str; 2] = ["memory", "cpu"];

/// The subtree this supervisor owns, once made.
#[derive(Debug)]
pub(crate) struct Subtree {
    pub dir: PathBuf,
    /// The supervisor's own cgroup directory (where it goes back to at exit).
    own: PathBuf,
    /// The supervisor moved itself into `dir/supervisor` to enable controllers.
    moved_self: bool,
    /// Controllers enabled for the children of `dir` (its cgroup.subtree_control).
    pub controllers: BTreeSet<String>,
    /// Why a wanted controller is not available (for `status`).
    pub missing: Vec<(String, String)>,
}

/// The mount point of the cgroup2 file system, from the text of /proc/self/mountinfo.
pub(crate) fn parse_mount(mountinfo: &str) -> Option<PathBuf> {
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

/// The v2 cgroup path of a process, from the text of /proc/<pid>/cgroup (the `0::` line).
pub(crate) fn parse_own(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_end_matches(" (deleted)").to_string())
}

/// `ringrift-<hash>`: the subtree's name for a root (FNV-1a of the path, 64 bits).
pub(crate) fn subtree_name(root: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in root.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ringrift-{h:016x}")
}

/// The cgroup directory of the calling process's parent of the subtree: `<mount><own cgroup>`.
/// Err says why there is none.
fn own_dir() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = parse_mount(&mountinfo).ok_or("no cgroup2 file system is mounted")?;
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = parse_own(&text).ok_or("/proc/self/cgroup has no cgroup v2 (0::) line")?;
    Ok(mount.join(own.trim_start_matches('/')))
}

impl Subtree {
    /// Makes (or takes over and empties) this root's subtree. Err says why cgroups cannot be had.
    pub(crate) fn create(root: &Path) -> Result<(Subtree, Vec<String>), String> {
        let own = own_dir()?;
        let dir = own.join(subtree_name(root));
        let mut notes = Vec::new();
        if dir.exists() {
            notes.push(format!(
                "{} was left by an earlier supervisor of this root: killing what is in it and removing it",
                dir.display()
            ));
            kill_tree(&dir);
            remove_tree(&dir, Duration::from_secs(5))?;
        }
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // Both cgroup.kill and populated events are needed to contain; refuse a kernel without them.
        if !dir.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "{} has no cgroup.kill (kernel older than 5.14)",
                dir.display()
            ));
        }
        let mut tree = Subtree {
            dir,
            own,
            moved_self: false,
            controllers: BTreeSet::new(),
            missing: Vec::new(),
        };
        tree.enable_controllers();
        Ok((tree, notes))
    }

    /// Enables `memory` and `cpu` for the children of the subtree where the hierarchy offers them.
    fn enable_controllers(&mut self) {
        let available = read_set(&self.own.join("cgroup.controllers"));
        for c in WANTED_CONTROLLERS {
            if !available.contains(c) {
                self.missing.push((
                    c.to_string(),
                    format!(
                        "the {c} controller is not available in the cgroup v2 hierarchy at {} (its cgroup.controllers lists: {})",
                        self.own.display(),
                        available.iter().cloned().collect::<Vec<_>>().join(" ")
                    ),
                ));
            }
        }
        let wanted: Vec<&str> = WANTED_CONTROLLERS
            .into_iter()
            .filter(|c| available.contains(*c))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let own_control = self.own.join("cgroup.subtree_control");
        let enable_own = |wanted: &[&str]| -> Vec<(String, io::Error)> {
            wanted
                .iter()
                .filter_map(|c| {
                    write_file(&own_control, &format!("+{c}"))
                        .err()
                        .map(|e| (c.to_string(), e))
                })
                .collect()
        };
        let mut failed = enable_own(&wanted);
        // EBUSY: the supervisor's own cgroup has processes (the supervisor): move into a leaf.
        if failed
            .iter()
            .any(|(_, e)| e.raw_os_error() == Some(nix::libc::EBUSY))
        {
            let leaf = self.dir.join("supervisor");
            if std::fs::create_dir(&leaf).is_ok()
                && write_file(&leaf.join("cgroup.procs"), "0").is_ok()
            {
                self.moved_self = true;
                failed = enable_own(&wanted);
            }
        }
        for (c, e) in failed {
            self.missing.push((
                c.clone(),
                format!(
                    "cannot enable the {c} controller in {}: {e}",
                    own_control.display()
                ),
            ));
        }
        let control = self.dir.join("cgroup.subtree_control");
        for c in wanted {
            if self.missing.iter().any(|(m, _)| m == c) {
                continue;
            }
            match write_file(&control, &format!("+{c}")) {
                Ok(()) => {
                    self.controllers.insert(c.to_string());
                }
                Err(e) => self.missing.push((
                    c.to_string(),
                    format!(
                        "cannot enable the {c} controller in {}: {e}",
                        control.display()
                    ),
                )),
            }
        }
    }

    /// Makes the cgroup of one daemon or job (`daemon-<name>`, `job-<id>`) and applies its limits.
    /// Returns the directory and one message per limit that could not be applied.
    pub(crate) fn make_unit(&self, leaf: &str, limits: &Limits) -> io::Result<(PathBuf, Vec<String>)> {
        let dir = self.dir.join(leaf);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // An earlier process of the same name that was not removed yet: empty it first.
                kill_tree(&dir);
            }
            Err(e) => return Err(e),
        }
        let mut problems = Vec::new();
        for (controller, file, contents, key) in limits.files() {
            if !self.controllers.contains(controller) {
                let why = self
                    .missing
                    .iter()
                    .find(|(c, _)| c == controller)
                    .map(|(_, w)| w.clone())
                    .unwrap_or_else(|| format!("the {controller} controller is not enabled"));
                problems.push(format!("{key} not applied: {why}"));
                continue;
            }
            if let Err(e) = write_file(&dir.join(file), &contents) {
                problems.push(format!(
                    "{key} not applied: cannot write '{contents}' to {}: {e}",
                    dir.join(file).display()
                ));
            }
        }
        Ok((dir, problems))
    }

    /// Kills everything left in the subtree, removes it, and moves the supervisor back to its own
    /// cgroup if it had left it. Returns what could not be removed.
    pub(crate) fn teardown(&mut self) -> Result<(), String> {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name() != "supervisor" && e.path().is_dir() {
                kill_tree(&e.path());
            }
        }
        if self.moved_self {
            write_file(&self.own.join("cgroup.procs"), "0").map_err(|e| {
                format!(
                    "cannot move the supervisor back to {}: {e}",
                    self.own.display()
                )
            })?;
            self.moved_self = false;
        }
        remove_tree(&self.dir, Duration::from_secs(5))
    }
}

/// Opens a cgroup's `cgroup.procs` for a child to write "0" into between fork and exec.
pub(crate) fn open_procs(dir: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
}

/// Pids in a cgroup (not its descendants').
pub(crate) fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True while a process is left in the cgroup or a descendant (`populated 1` in cgroup.events).
/// A cgroup that no longer exists is empty.
pub(crate) fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// SIGKILL to every process of the cgroup and its descendants, at once (cgroup.kill, Linux 5.14).
pub(crate) fn kill(dir: &Path) -> io::Result<()> {
    write_file(&dir.join("cgroup.kill"), "1")
}

/// Freezes or thaws the whole cgroup (cgroup.freeze, Linux 5.2).
pub(crate) fn freeze(dir: &Path, frozen: bool) -> io::Result<()> {
    write_file(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

/// The cgroup a process is in, as a directory under the mount, if it can be read.
pub(crate) fn of_pid(pid: u32) -> Option<String> {
    parse_own(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// Kills everything in a cgroup tree (thawing it first, so nothing waits frozen).
fn kill_tree(dir: &Path) {
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

/// Removes a cgroup and its descendants, deepest first, waiting (bounded) for them to empty.
pub(crate) fn remove_tree(dir: &Path, wait: Duration) -> Result<(), String> {
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
    rm(dir).map_err(|e| format!("cannot remove {}: {e}", dir.display()))
}

/// Removes one empty cgroup (no descendants). Ok when it is gone.
pub(crate) fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn read_set(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// One write(2) of the whole text, as cgroup files require.
fn write_file(path: &Path, text: &str) -> io::Result<()> {
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
        let pure = "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
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
}
