//! JOB_REAPER's decisions: which processes of this root's tree to stop, and why.
//!
//! A process belongs to the tree when its environment carries `RINGRIFT_ROOT=<root>` (every daemon and
//! job the supervisor spawns does, and their children inherit it). Among those, the reaper stops:
//! jobs past their deadline, jobs stuck without CPU time or output, orphans left by an earlier
//! supervisor, and strays: processes of the live supervisor's tree whose daemon or job has no
//! process any more (they escaped its stop, e.g. with setsid); zombies get their parent poked. Everything else — including any process outside the
//! tree — is left alone. Plain functions over a snapshot, so every rule is tested without processes.

use std::collections::BTreeMap;

/// One process of the snapshot, as the scanner saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeProc {
    /// Process id.
    pub pid: u32,
    /// Parent's pid (field 4 of `/proc/<pid>/stat`); the one poked for a zombie.
    pub ppid: u32,
    /// Process group id (field 5 of `/proc/<pid>/stat`); 0 or 1 is never killed as a group.
    pub pgid: u32,
    /// State letter of `/proc/<pid>/stat` (proc(5)): `R`, `S`, `D`, `T`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// CPU time used, user plus system, in clock ticks (utime + stime of `/proc/<pid>/stat`; see
    /// [`crate::os::procfs::ticks_per_sec`]).
    pub cpu_ticks: u64,
    /// Kernel start time (ticks since boot), to recognise the same process across passes.
    pub start_time: u64,
    /// Seconds since the process started.
    pub age_secs: f64,
    /// The command line, arguments joined by spaces (empty when unreadable, or not in the tree).
    pub cmd: String,
    /// RINGRIFT_ROOT matches this root (and a supervisor pid is recorded): only such processes are
    /// ever judged.
    pub in_tree: bool,
    /// RINGRIFT_SUPERVISOR_PID: the supervisor that spawned it (or its ancestor).
    pub supervisor_pid: Option<u32>,
    /// RINGRIFT_JOB_ID: the job it runs (or whose child it is), for job processes and their children.
    pub job_id: Option<String>,
    /// RINGRIFT_JOB_DEADLINE: when the job must be over, in unix seconds; past it the job is overdue.
    pub job_deadline: Option<u64>,
    /// Seconds since the job last wrote output (its log file's age), when known.
    pub output_age_secs: Option<f64>,
    /// RINGRIFT_JOB_STUCK_AFTER: the job's own allowance of silence, in seconds, from its kind's
    /// `pipeline.jobs.<kind>.stuck_after` (0: never stuck); None: [`Policy::stuck_after_secs`].
    pub job_stuck_after: Option<f64>,
    /// RINGRIFT_DAEMON: the daemon it was started for (or whose job it is).
    pub daemon: Option<String>,
    /// Whether the supervisor lists the process's daemon (or job) as running in run/processes;
    /// None when that is unknown (no list, or not a process of the live supervisor).
    pub unit_live: Option<bool>,
}

/// A process younger than this is never called a stray: the supervisor may not have recorded its
/// daemon in run/processes yet.
pub const STRAY_MIN_AGE_SECS: f64 = 2.0;

/// The reaper's tunables.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// A job with no CPU time (over all its processes) and no output for this long, in seconds,
    /// is stuck (default 600), unless the job carries its own allowance
    /// ([`TreeProc::job_stuck_after`]).
    pub stuck_after_secs: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            stuck_after_secs: 600.0,
        }
    }
}

/// Why a process is acted on; its `Display` is the text logged and put in the JOB_REAPED event.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// A job process still alive after its RINGRIFT_JOB_DEADLINE.
    OverdueJob {
        /// RINGRIFT_JOB_ID of the process.
        job_id: String,
        /// How far past the deadline, in whole seconds.
        overdue_secs: u64,
    },
    /// A job process with neither CPU time nor output for [`Policy::stuck_after_secs`].
    Stuck {
        /// RINGRIFT_JOB_ID of the process.
        job_id: String,
        /// Seconds without CPU time and output (the shorter of the two).
        idle_secs: f64,
    },
    /// Spawned by a supervisor of this root that is not the live one (or by none recorded).
    Orphan {
        /// RINGRIFT_SUPERVISOR_PID of the process, when it carries one.
        supervisor_pid: Option<u32>,
    },
    /// Of the live supervisor's tree, but its daemon (or job) has no process any more.
    Stray {
        /// What is gone, as text: `job <id>`, `daemon <name>`, or `its daemon`.
        of: String,
    },
    /// A zombie (state `Z` or `X`) whose parent, not the live supervisor, has not reaped it.
    Zombie {
        /// The parent's pid, which is sent SIGCHLD.
        parent: u32,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::OverdueJob {
                job_id,
                overdue_secs,
            } => write!(f, "job {job_id} overdue by {overdue_secs}s"),
            Reason::Stuck { job_id, idle_secs } => write!(
                f,
                "job {job_id} stuck: no CPU time and no output for {idle_secs:.0}s"
            ),
            Reason::Orphan {
                supervisor_pid: Some(p),
            } => write!(f, "orphan of an earlier supervisor (pid {p})"),
            Reason::Orphan {
                supervisor_pid: None,
            } => write!(f, "orphan: no supervisor recorded"),
            Reason::Stray { of } => write!(f, "stray: {of} is no longer running"),
            Reason::Zombie { parent } => write!(f, "zombie not reaped by its parent {parent}"),
        }
    }
}

impl Reason {
    /// The variant as a short stable name: `overdue_job`, `stuck`, `orphan`, `stray` or `zombie`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::OverdueJob { .. } => "overdue_job",
            Reason::Stuck { .. } => "stuck",
            Reason::Orphan { .. } => "orphan",
            Reason::Stray { .. } => "stray",
            Reason::Zombie { .. } => "zombie",
        }
    }
}

/// What to do with a process a [`Reason`] applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// SIGTERM, grace, SIGKILL: to the whole group when `group` is set, else to the pid alone.
    Kill {
        /// The process group to signal: set only when every member is of the same job or the same
        /// dead supervisor and none is the supervisor or the reaper.
        group: Option<u32>,
    },
    /// Send SIGCHLD to the parent so it reaps its child.
    NotifyParent {
        /// The zombie's parent pid.
        parent: u32,
    },
}

/// One decision of [`decide`]: a process, why it is acted on, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The process's pid.
    pub pid: u32,
    /// Its command line ([`TreeProc::cmd`]), for the log and the event.
    pub cmd: String,
    /// Seconds since it started ([`TreeProc::age_secs`]).
    pub age_secs: f64,
    /// Why it is acted on.
    pub reason: Reason,
    /// What to do.
    pub action: Action,
}

/// CPU time seen across passes, per job: a signature of its processes (pid, start time) and
/// their CPU times, and the seconds when it last changed.
#[derive(Debug, Clone, Default)]
pub struct CpuHistory(BTreeMap<String, (u64, f64)>);

impl CpuHistory {
    /// Records this pass per job and returns, per job id, how long the job as a whole has shown
    /// no activity: no CPU time in any of its processes, none started or ended (None: first
    /// sight of a job that has used CPU). A job whose processes never used any CPU has been
    /// idle since its youngest process started.
    fn observe_jobs(&mut self, procs: &[TreeProc], now: f64) -> BTreeMap<String, Option<f64>> {
        let mut of_job: BTreeMap<&str, Vec<&TreeProc>> = BTreeMap::new();
        for p in procs {
            if let Some(job) = &p.job_id
                && p.state != 'Z'
                && p.state != 'X'
            {
                of_job.entry(job).or_default().push(p);
            }
        }
        let mut idle = BTreeMap::new();
        let mut next = BTreeMap::new();
        for (job, mut members) in of_job {
            members.sort_by_key(|p| p.pid);
            let mut sig: u64 = 0xcbf2_9ce4_8422_2325;
            for p in &members {
                for n in [u64::from(p.pid), p.start_time, p.cpu_ticks] {
                    for b in n.to_le_bytes() {
                        sig = (sig ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
                    }
                }
            }
            let (secs, since) = match self.0.get(job) {
                Some(&(prev, since)) if prev == sig => (Some(now - since), since),
                Some(_) => (Some(0.0), now),
                None if members.iter().all(|p| p.cpu_ticks == 0) => {
                    let youngest = members
                        .iter()
                        .map(|p| p.age_secs)
                        .fold(f64::INFINITY, f64::min);
                    (Some(youngest), now - youngest)
                }
                None => (None, now),
            };
            idle.insert(job.to_string(), secs);
            next.insert(job.to_string(), (sig, since));
        }
        self.0 = next;
        idle
    }
}

/// Decides what to do with a snapshot. `current_supervisor` is the live supervisor of this root,
/// if any; `reaper_pid` is the process making the decision (never touched); `now_unix` and `now`
/// are wall-clock and monotonic seconds.
pub fn decide(
    procs: &[TreeProc],
    current_supervisor: Option<u32>,
    reaper_pid: u32,
    now_unix: u64,
    now: f64,
    history: &mut CpuHistory,
    policy: &Policy,
) -> Vec<Verdict> {
    let tree: Vec<&TreeProc> = procs.iter().filter(|p| p.in_tree).collect();
    let owned: Vec<TreeProc> = tree.iter().map(|p| (*p).clone()).collect();
    let job_idle = history.observe_jobs(&owned, now);
    let mut verdicts = Vec::new();
    for p in &tree {
        if p.pid == reaper_pid || Some(p.pid) == current_supervisor {
            continue;
        }
        if p.state == 'Z' || p.state == 'X' {
            if Some(p.ppid) != current_supervisor {
                verdicts.push(verdict(
                    p,
                    Reason::Zombie { parent: p.ppid },
                    Action::NotifyParent { parent: p.ppid },
                ));
            }
            continue;
        }
        let reason = if p.supervisor_pid.is_none() || p.supervisor_pid != current_supervisor {
            Some(Reason::Orphan {
                supervisor_pid: p.supervisor_pid,
            })
        } else if p.unit_live == Some(false) && p.age_secs >= STRAY_MIN_AGE_SECS {
            Some(Reason::Stray {
                of: match (&p.job_id, &p.daemon) {
                    (Some(job), _) => format!("job {job}"),
                    (None, Some(d)) => format!("daemon {d}"),
                    (None, None) => "its daemon".to_string(),
                },
            })
        } else if let (Some(job), Some(deadline)) = (&p.job_id, p.job_deadline)
            && now_unix > deadline
        {
            Some(Reason::OverdueJob {
                job_id: job.clone(),
                overdue_secs: now_unix - deadline,
            })
        } else if let Some(job) = &p.job_id {
            // Judged as a whole: a shell waiting for its busy child is not stuck. Idle for how
            // long: no CPU time in any of the job's processes across passes, or none at all
            // since its youngest process started on the first look.
            let idle = job_idle.get(job).copied().flatten();
            let quiet = p.output_age_secs.unwrap_or(p.age_secs);
            let allowed = p.job_stuck_after.unwrap_or(policy.stuck_after_secs);
            match idle {
                Some(idle) if allowed > 0.0 && idle >= allowed && quiet >= allowed => {
                    Some(Reason::Stuck {
                        job_id: job.clone(),
                        idle_secs: idle.min(quiet),
                    })
                }
                _ => None,
            }
        } else {
            None
        };
        if let Some(reason) = reason {
            let group = safe_group(p, procs, current_supervisor, reaper_pid);
            verdicts.push(verdict(p, reason, Action::Kill { group }));
        }
    }
    verdicts
}

fn verdict(p: &TreeProc, reason: Reason, action: Action) -> Verdict {
    Verdict {
        pid: p.pid,
        cmd: p.cmd.clone(),
        age_secs: p.age_secs,
        reason,
        action,
    }
}

/// The process group may be killed as a whole only when every member is of the same kind as the
/// target (same job, or same dead supervisor) and none is the supervisor or the reaper.
fn safe_group(
    target: &TreeProc,
    all: &[TreeProc],
    current_supervisor: Option<u32>,
    reaper_pid: u32,
) -> Option<u32> {
    if target.pgid == 0 || target.pgid == 1 {
        return None;
    }
    let members: Vec<&TreeProc> = all.iter().filter(|p| p.pgid == target.pgid).collect();
    let same_kind = members.iter().all(|m| {
        m.in_tree
            && m.pid != reaper_pid
            && Some(m.pid) != current_supervisor
            && m.supervisor_pid == target.supervisor_pid
            && m.job_id == target.job_id
            && m.daemon == target.daemon
    });
    same_kind.then_some(target.pgid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUP: u32 = 100;
    const REAPER: u32 = 150;

    fn proc(pid: u32) -> TreeProc {
        TreeProc {
            pid,
            ppid: SUP,
            pgid: pid,
            state: 'S',
            cpu_ticks: 5,
            start_time: 1000 + pid as u64,
            age_secs: 30.0,
            cmd: format!("cmd{pid}"),
            in_tree: true,
            supervisor_pid: Some(SUP),
            job_id: None,
            job_deadline: None,
            output_age_secs: None,
            job_stuck_after: None,
            daemon: Some(format!("d{pid}")),
            unit_live: Some(true),
        }
    }

    fn job(pid: u32, deadline: u64) -> TreeProc {
        TreeProc {
            job_id: Some(format!("j{pid}")),
            job_deadline: Some(deadline),
            ..proc(pid)
        }
    }

    fn run(procs: &[TreeProc]) -> Vec<Verdict> {
        decide(
            procs,
            Some(SUP),
            REAPER,
            10_000,
            0.0,
            &mut CpuHistory::default(),
            &Policy {
                stuck_after_secs: 60.0,
            },
        )
    }

    #[test]
    fn strays_of_stopped_daemons_and_ended_jobs_are_killed() {
        let escaped = TreeProc {
            pgid: 500,
            unit_live: Some(false),
            ..proc(501)
        };
        let young = TreeProc {
            unit_live: Some(false),
            age_secs: 0.5,
            ..proc(502)
        };
        let unknown = TreeProc {
            unit_live: None,
            ..proc(503)
        };
        let job_left = TreeProc {
            unit_live: Some(false),
            ..job(504, 20_000)
        };
        let v = run(&[escaped, young, unknown, job_left]);
        let got: Vec<(u32, String)> = v.iter().map(|v| (v.pid, v.reason.to_string())).collect();
        assert_eq!(
            got,
            vec![
                (501, "stray: daemon d501 is no longer running".to_string()),
                (504, "stray: job j504 is no longer running".to_string()),
            ]
        );
        assert_eq!(v[0].reason.kind(), "stray");
    }

    #[test]
    fn healthy_daemons_and_jobs_are_left_alone() {
        assert!(run(&[proc(200), job(201, 20_000)]).is_empty());
    }

    #[test]
    fn processes_outside_the_tree_are_never_touched() {
        let stranger = TreeProc {
            in_tree: false,
            supervisor_pid: Some(7),
            ..proc(300)
        };
        let overdue_stranger = TreeProc {
            in_tree: false,
            ..job(301, 1)
        };
        assert!(run(&[stranger, overdue_stranger]).is_empty());
    }

    #[test]
    fn the_supervisor_and_the_reaper_are_never_touched() {
        let sup = TreeProc {
            pid: SUP,
            supervisor_pid: None,
            ..proc(SUP)
        };
        let me = TreeProc {
            pid: REAPER,
            supervisor_pid: Some(1),
            ..proc(REAPER)
        };
        assert!(run(&[sup, me]).is_empty());
    }

    #[test]
    fn overdue_job_is_killed_with_its_group() {
        let leader = job(400, 9_000);
        let child = TreeProc {
            pid: 401,
            ppid: 400,
            pgid: 400,
            ..job(400, 9_000)
        };
        let child = TreeProc { pid: 401, ..child };
        let v = run(&[leader, child]);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0].reason,
            Reason::OverdueJob {
                job_id: "j400".into(),
                overdue_secs: 1000
            }
        );
        assert_eq!(v[0].action, Action::Kill { group: Some(400) });
    }

    #[test]
    fn orphans_of_an_earlier_supervisor_are_killed() {
        let orphan = TreeProc {
            supervisor_pid: Some(55),
            ppid: 1,
            ..proc(500)
        };
        let v = run(&[orphan]);
        assert_eq!(
            v[0].reason,
            Reason::Orphan {
                supervisor_pid: Some(55)
            }
        );
        assert!(v[0].reason.to_string().contains("earlier supervisor"));
        // Without a live supervisor, every tree process is an orphan.
        let v = decide(
            &[proc(501)],
            None,
            REAPER,
            0,
            0.0,
            &mut CpuHistory::default(),
            &Policy::default(),
        );
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn a_group_shared_with_a_live_daemon_is_not_killed_whole() {
        let daemon = proc(600);
        let orphan_in_its_group = TreeProc {
            pid: 601,
            pgid: 600,
            supervisor_pid: Some(55),
            ..proc(601)
        };
        let v = run(&[daemon, orphan_in_its_group]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pid, 601);
        assert_eq!(v[0].action, Action::Kill { group: None });
    }

    #[test]
    fn stuck_job_needs_flat_cpu_and_no_output() {
        let mut h = CpuHistory::default();
        let p = Policy {
            stuck_after_secs: 60.0,
        };
        let j = TreeProc {
            output_age_secs: Some(1000.0),
            ..job(700, 99_999)
        };
        assert!(
            decide(
                std::slice::from_ref(&j),
                Some(SUP),
                REAPER,
                0,
                0.0,
                &mut h,
                &p
            )
            .is_empty(),
            "first sight with CPU used"
        );
        assert!(
            decide(
                std::slice::from_ref(&j),
                Some(SUP),
                REAPER,
                0,
                30.0,
                &mut h,
                &p
            )
            .is_empty(),
            "flat for 30 s only"
        );
        let v = decide(
            std::slice::from_ref(&j),
            Some(SUP),
            REAPER,
            0,
            61.0,
            &mut h,
            &p,
        );
        assert!(matches!(v[0].reason, Reason::Stuck { .. }), "{v:?}");
        // CPU moved: not stuck.
        let busy = TreeProc {
            cpu_ticks: 99,
            ..j.clone()
        };
        assert!(decide(&[busy], Some(SUP), REAPER, 0, 62.0, &mut h, &p).is_empty());
        // Writing output: not stuck even with flat CPU.
        let mut h = CpuHistory::default();
        let talking = TreeProc {
            output_age_secs: Some(1.0),
            cpu_ticks: 0,
            age_secs: 1000.0,
            ..job(701, 99_999)
        };
        assert!(decide(&[talking], Some(SUP), REAPER, 0, 0.0, &mut h, &p).is_empty());
    }

    #[test]
    fn a_job_is_judged_as_a_whole_and_by_its_own_allowance() {
        let p = Policy {
            stuck_after_secs: 60.0,
        };
        let quiet = |pid: u32, ticks: u64| TreeProc {
            output_age_secs: Some(1000.0),
            cpu_ticks: ticks,
            job_id: Some("train-1".into()),
            pgid: 1100,
            ..job(pid, 99_999)
        };
        // A shell waiting (flat CPU) for its child, which computes: not stuck.
        let mut h = CpuHistory::default();
        for (t, ticks) in [(0.0, 10), (61.0, 20), (122.0, 30)] {
            let v = decide(
                &[quiet(1101, 5), quiet(1102, ticks)],
                Some(SUP),
                REAPER,
                0,
                t,
                &mut h,
                &p,
            );
            assert!(v.is_empty(), "at {t}: {v:?}");
        }
        // Both flat: the whole job is stuck, each of its processes named.
        let v = decide(
            &[quiet(1101, 5), quiet(1102, 30)],
            Some(SUP),
            REAPER,
            0,
            183.0,
            &mut h,
            &p,
        );
        assert_eq!(v.len(), 2, "{v:?}");
        // A kind with its own allowance: 0 is never, a longer one waits longer.
        for (allow, stuck) in [(0.0, false), (300.0, false), (100.0, true)] {
            let j = TreeProc {
                job_stuck_after: Some(allow),
                cpu_ticks: 0,
                age_secs: 200.0,
                ..quiet(1103, 0)
            };
            let v = decide(
                &[j],
                Some(SUP),
                REAPER,
                0,
                0.0,
                &mut CpuHistory::default(),
                &p,
            );
            assert_eq!(!v.is_empty(), stuck, "allowance {allow}: {v:?}");
        }
    }

    #[test]
    fn a_job_that_never_used_cpu_is_stuck_on_first_sight() {
        let j = TreeProc {
            cpu_ticks: 0,
            age_secs: 120.0,
            ..job(800, 99_999)
        };
        let v = run(&[j]);
        assert!(matches!(v[0].reason, Reason::Stuck { .. }));
    }

    #[test]
    fn zombies_get_their_parent_notified_unless_the_supervisor_reaps_them() {
        let z = TreeProc {
            state: 'Z',
            ppid: 900,
            ..proc(901)
        };
        let v = run(&[z]);
        assert_eq!(v[0].action, Action::NotifyParent { parent: 900 });
        let ours = TreeProc {
            state: 'Z',
            ppid: SUP,
            ..proc(902)
        };
        assert!(run(&[ours]).is_empty());
    }

    #[test]
    fn a_reused_pid_starts_a_fresh_cpu_history() {
        let mut h = CpuHistory::default();
        let p = Policy {
            stuck_after_secs: 60.0,
        };
        let j = TreeProc {
            output_age_secs: Some(1000.0),
            ..job(1000, 99_999)
        };
        decide(
            std::slice::from_ref(&j),
            Some(SUP),
            REAPER,
            0,
            0.0,
            &mut h,
            &p,
        );
        let reused = TreeProc { start_time: 5, ..j };
        assert!(decide(&[reused], Some(SUP), REAPER, 0, 100.0, &mut h, &p).is_empty());
    }
}
