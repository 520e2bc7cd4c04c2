//! Containment: what "every process of this daemon (or job)" means when the supervisor signals,
//! kills, freezes or waits for it.
//!
//! - **cgroup**: each daemon and job runs in its own cgroup v2 (see [`crate::cgroup`]). Whatever a
//!   process does with sessions and process groups, it stays in its cgroup: stop signals every
//!   member, `cgroup.kill` ends them all at once, `cgroup.freeze` pauses them, and the unit is gone
//!   only when `cgroup.events` says `populated 0`.
//! - **process-group+environment** (no writable cgroup, or `containment: process-group`): the
//!   process group the child leads, plus every process whose environment carries this root's and
//!   this supervisor's markers and the unit's name (`RINGRIFT_DAEMON` without `RINGRIFT_JOB_ID`
//!   for a daemon, `RINGRIFT_JOB_ID` for a job), found by a /proc scan when the unit is signalled
//!   or waited for. A process that left the group (setsid) is still found; one that also cleared
//!   its environment is not.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ringrift::cgroupfs::RemoveError;
use ringrift::limits::Limits;
use ringrift::protocol::{DAEMON_ENV, JOB_ID_ENV, ROOT_ENV, SUPERVISOR_PID_ENV};

use crate::cgroup::{self, Subtree};
use crate::unix;

/// How `status` names the two kinds of containment.
pub(crate) const CGROUP: &str = "cgroup";
pub(crate) const FALLBACK: &str = "process-group+environment";

/// The supervisor-wide containment: a cgroup subtree, or the fallback and why.
pub(crate) struct Containment {
    root: PathBuf,
    /// run/cgroup: the subtree's path, for the reaper (which finds a dead supervisor's subtree).
    record: PathBuf,
    subtree: Option<Subtree>,
    /// Why there is no subtree (logged once at start-up, shown by `status`).
    pub why_not: Option<String>,
}

/// Which processes a unit is: one daemon (by name) or one job (by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Member {
    Daemon(String),
    Job(String),
}

/// Every process started for one daemon or job.
#[derive(Debug)]
pub(crate) struct Unit {
    /// The process group the child leads (its pid).
    pub pgid: u32,
    cgroup: Option<PathBuf>,
    root: String,
    member: Member,
    /// Limits that could not be applied, and why.
    pub limit_problems: Vec<String>,
    /// Why this unit has no cgroup although the supervisor has a subtree.
    pub why_not: Option<String>,
}

/// What the spawner needs before the fork: the cgroup to enter and its open cgroup.procs.
pub(crate) struct Prepared {
    pub cgroup: Option<PathBuf>,
    pub procs: Option<std::fs::File>,
    pub limit_problems: Vec<String>,
    pub why_not: Option<String>,
}

impl Containment {
    /// Sets up containment for this root: the cgroup subtree unless `disabled` names why not.
    /// Returns notes for the log (a leftover subtree taken over, ...).
    pub(crate) fn new(
        root: &Path,
        run_dir: &Path,
        disabled: Option<&str>,
    ) -> (Containment, Vec<String>) {
        let record = run_dir.join(ringrift::cgroupfs::RECORD_FILE);
        let (subtree, why_not, mut notes) = match disabled {
            Some(why) => (None, Some(why.to_string()), Vec::new()),
            None => match Subtree::create(root) {
                Ok((s, notes)) => (Some(s), None, notes),
                Err(why) => (None, Some(why.to_string()), Vec::new()),
            },
        };
        match &subtree {
            Some(s) => {
                if let Err(e) = std::fs::write(&record, format!("{}\n", s.dir.display())) {
                    notes.push(format!("cannot write {}: {e}", record.display()));
                }
            }
            None => {
                let _ = std::fs::remove_file(&record);
            }
        }
        (
            Containment {
                root: root.to_path_buf(),
                record,
                subtree,
                why_not,
            },
            notes,
        )
    }

    /// "cgroup" or "process-group+environment", for units spawned from now on.
    pub(crate) fn kind(&self) -> &'static str {
        if self.subtree.is_some() {
            CGROUP
        } else {
            FALLBACK
        }
    }

    /// The subtree's directory, when there is one.
    pub(crate) fn subtree_dir(&self) -> Option<&Path> {
        self.subtree.as_ref().map(|s| s.dir.as_path())
    }

    /// Prepares the cgroup of a unit about to be spawned (made, limits applied, cgroup.procs open).
    pub(crate) fn prepare(&self, member: &Member, limits: &Limits) -> Prepared {
        let Some(tree) = &self.subtree else {
            let why = self.why_not.clone().unwrap_or_default();
            return Prepared {
                cgroup: None,
                procs: None,
                limit_problems: limits
                    .files()
                    .iter()
                    .map(|(_, _, _, key)| format!("{key} not applied: no cgroup: {why}"))
                    .collect(),
                why_not: None,
            };
        };
        let leaf = match member {
            Member::Daemon(name) => format!("daemon-{name}"),
            Member::Job(id) => format!("job-{id}"),
        };
        let made = tree
            .make_unit(&leaf, limits)
            .and_then(|(dir, problems)| cgroup::open_procs(&dir).map(|f| (dir, problems, f)));
        match made {
            Ok((dir, limit_problems, f)) => Prepared {
                cgroup: Some(dir),
                procs: Some(f),
                limit_problems,
                why_not: None,
            },
            Err(e) => Prepared {
                cgroup: None,
                procs: None,
                limit_problems: Vec::new(),
                why_not: Some(format!(
                    "cannot make cgroup {}: {e}",
                    tree.dir.join(&leaf).display()
                )),
            },
        }
    }

    /// The unit of a child just spawned with `prepared`: checks that the child really entered its
    /// cgroup (its pre-exec write may have failed) and falls back to the group + environment if not.
    pub(crate) fn unit(&self, member: Member, pid: u32, prepared: Prepared) -> Unit {
        let mut why_not = prepared.why_not;
        let mut cgroup = prepared.cgroup;
        if let (Some(dir), Some(tree)) = (&cgroup, &self.subtree) {
            let want = dir.strip_prefix(&tree.dir).ok().map(Path::to_path_buf);
            let actual = cgroup::of_pid(pid);
            let inside = match (&want, &actual) {
                (Some(w), Some(a)) => a.ends_with(&format!(
                    "{}/{}",
                    tree.dir.file_name().unwrap_or_default().to_string_lossy(),
                    w.display()
                )),
                _ => false,
            };
            // A child that already exited has no cgroup to read: trust the write then.
            if !inside && actual.is_some() {
                why_not = Some(format!(
                    "the child did not enter {} (it is in {})",
                    dir.display(),
                    actual.unwrap_or_default()
                ));
                let _ = cgroup::remove(dir);
                cgroup = None;
            }
        }
        Unit {
            pgid: pid,
            cgroup,
            root: self.root.display().to_string(),
            member,
            limit_problems: prepared.limit_problems,
            why_not,
        }
    }

    /// Removes the whole subtree (killing whatever is left in it); for supervisor exit.
    pub(crate) fn teardown(&mut self) -> Result<(), cgroup::CgroupError> {
        match self.subtree.take() {
            Some(mut s) => {
                s.teardown()?;
                let _ = std::fs::remove_file(&self.record);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Unit {
    /// "cgroup" or "process-group+environment".
    pub(crate) fn kind(&self) -> &'static str {
        if self.cgroup.is_some() {
            CGROUP
        } else {
            FALLBACK
        }
    }

    /// Sends `sig` to every process of the unit: its process group and every other member.
    pub(crate) fn signal(&self, sig: Signal) {
        unix::signal_group(self.pgid, sig);
        for pid in self.members() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL to every process of the unit, at once where a cgroup allows.
    pub(crate) fn kill(&self) {
        if let Some(dir) = &self.cgroup {
            // A frozen process dies on cgroup.kill too, but thaw first so nothing lingers.
            let _ = cgroup::freeze(dir, false);
            if cgroup::kill(dir).is_ok() {
                unix::signal_group(self.pgid, Signal::SIGKILL);
                return;
            }
        }
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGKILL);
    }

    /// Freezes (pause) or thaws (resume) the unit: cgroup.freeze, or SIGSTOP/SIGCONT to the group
    /// and members.
    pub(crate) fn freeze(&self, frozen: bool) {
        if let Some(dir) = &self.cgroup
            && cgroup::freeze(dir, frozen).is_ok()
        {
            return;
        }
        self.signal(if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        });
    }

    /// True while any process of the unit is left (zombies of the group included: they are about
    /// to be reaped).
    pub(crate) fn alive(&self) -> bool {
        if let Some(dir) = &self.cgroup
            && cgroup::populated(dir)
        {
            return true;
        }
        if !matches!(
            kill(Pid::from_raw(-(self.pgid as i32)), None),
            Err(Errno::ESRCH)
        ) {
            return true;
        }
        self.cgroup.is_none() && !self.members().is_empty()
    }

    /// Removes the unit's cgroup once it is empty. Err names the cgroup and why.
    pub(crate) fn remove(&self) -> Result<(), RemoveError> {
        match &self.cgroup {
            Some(dir) => cgroup::remove(dir).map_err(|source| RemoveError {
                dir: dir.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Live members other than through the process group: the cgroup's processes, or the
    /// environment sweep.
    fn members(&self) -> Vec<u32> {
        match &self.cgroup {
            Some(dir) => cgroup::procs(dir),
            None => sweep(&self.root, &self.member),
        }
    }
}

/// Processes of this supervisor's tree that belong to `member`, found by their environment.
fn sweep(root: &str, member: &Member) -> Vec<u32> {
    let me = std::process::id();
    let me_text = me.to_string();
    let mut out = Vec::new();
    for pid in ringrift::procfs::pids() {
        if pid == me {
            continue;
        }
        let Some(env) = ringrift::procfs::environ(pid) else {
            continue;
        };
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if var(ROOT_ENV) != Some(root) || var(SUPERVISOR_PID_ENV) != Some(me_text.as_str()) {
            continue;
        }
        let ours = match member {
            Member::Daemon(name) => var(DAEMON_ENV) == Some(name) && var(JOB_ID_ENV).is_none(),
            Member::Job(id) => var(JOB_ID_ENV) == Some(id),
        };
        if ours && ringrift::procfs::stat(pid).is_some_and(|s| !s.is_zombie()) {
            out.push(pid);
        }
    }
    out
}
