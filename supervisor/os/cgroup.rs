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
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringrift::cgroupfs::{OwnDirError, RemoveError, kill_tree, own_dir};
pub(crate) use ringrift::cgroupfs::{
    freeze, kill, of_pid, populated, procs, read_set, remove, remove_tree, subtree_name, write_file,
};
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
    /// Controllers this supervisor enabled in its own cgroup's subtree_control (disabled again at
    /// exit: its own cgroup cannot take the supervisor back while they are on).
    enabled_in_own: Vec<String>,
    /// Controllers enabled for the children of `dir` (its cgroup.subtree_control).
    pub controllers: BTreeSet<String>,
    /// Why a wanted controller is not available (for `status`).
    pub missing: Vec<(String, String)>,
}

/// Why the supervisor cannot have its cgroup subtree, or could not take it down. The message is
/// what `status` shows as the reason for the fallback containment.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    /// Where the supervisor's own cgroup is cannot be read from /proc.
    #[error(transparent)]
    NoOwnCgroup(#[from] OwnDirError),
    /// The subtree's directory could not be made.
    #[error("cannot create {dir}: {source}")]
    Create { dir: PathBuf, source: io::Error },
    /// The kernel has no cgroup.kill (before Linux 5.14), so a unit cannot be killed at once.
    #[error("{dir} has no cgroup.kill (kernel older than 5.14)")]
    NoKill { dir: PathBuf },
    /// A leftover subtree, a unit in it, or the subtree itself could not be removed.
    #[error(transparent)]
    Remove(#[from] RemoveError),
    /// At teardown, the supervisor could not go back to its own cgroup.
    #[error("cannot move the supervisor back to {own}: {source}")]
    MoveBack { own: PathBuf, source: io::Error },
}

impl Subtree {
    /// Makes (or takes over and empties) this root's subtree. Err says why cgroups cannot be had.
    pub(crate) fn create(root: &Path) -> Result<(Subtree, Vec<String>), CgroupError> {
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
        if let Err(source) = std::fs::create_dir(&dir) {
            return Err(CgroupError::Create { dir, source });
        }
        // Both cgroup.kill and populated events are needed to contain; refuse a kernel without them.
        if !dir.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err(CgroupError::NoKill { dir });
        }
        let mut tree = Subtree {
            dir,
            own,
            moved_self: false,
            enabled_in_own: Vec::new(),
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
        let already = read_set(&own_control);
        let wanted_own: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|c| !already.contains(*c))
            .collect();
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
        let mut failed = enable_own(&wanted_own);
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
                failed = enable_own(&wanted_own);
            }
        }
        self.enabled_in_own = wanted_own
            .iter()
            .filter(|c| !failed.iter().any(|(f, _)| f == *c))
            .map(|c| c.to_string())
            .collect();
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
    pub(crate) fn make_unit(
        &self,
        leaf: &str,
        limits: &Limits,
    ) -> io::Result<(PathBuf, Vec<String>)> {
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
    pub(crate) fn teardown(&mut self) -> Result<(), CgroupError> {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name() != "supervisor" && e.path().is_dir() {
                kill_tree(&e.path());
                remove_tree(&e.path(), Duration::from_secs(5))?;
            }
        }
        // Children first: a controller can be disabled only where no child still enables it.
        for c in &self.controllers {
            let _ = write_file(&self.dir.join("cgroup.subtree_control"), &format!("-{c}"));
        }
        for c in std::mem::take(&mut self.enabled_in_own) {
            let _ = write_file(&self.own.join("cgroup.subtree_control"), &format!("-{c}"));
        }
        if self.moved_self {
            write_file(&self.own.join("cgroup.procs"), "0").map_err(|source| {
                CgroupError::MoveBack {
                    own: self.own.clone(),
                    source,
                }
            })?;
            self.moved_self = false;
        }
        Ok(remove_tree(&self.dir, Duration::from_secs(5))?)
    }
}

/// Opens a cgroup's `cgroup.procs` for a child to write "0" into between fork and exec.
pub(crate) fn open_procs(dir: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
}
