//! JOB_REAPER's hands: takes a snapshot of this root's process tree from /proc, asks
//! `ringrift::reaper::decide` what to stop, and stops it (SIGTERM, grace, SIGKILL to the group,
//! and `cgroup.kill` to the process's cgroup when it is in the supervisor's subtree). When the
//! supervisor is dead, the cgroup subtree it recorded in run/cgroup is killed and removed too.
//! Used by the `job_reaper` daemon every cycle and by `ringrift-worker reap` for one pass now.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use ringrift::cgroupfs;
use ringrift::procfs;
use ringrift::protocol::{
    DAEMON_ENV, JOB_DEADLINE_ENV, JOB_ID_ENV, JOB_STUCK_AFTER_ENV, ROOT_ENV, SUPERVISOR_PID_ENV,
};
use ringrift::reaper::{self, Action, CpuHistory, Policy, TreeProc, Verdict};

/// One reaper: remembers CPU times between passes so it can tell a stuck job from a busy one.
pub(crate) struct Reaper {
    pub root: PathBuf,
    pub policy: Policy,
    pub grace: Duration,
    history: CpuHistory,
    started: Instant,
}

/// What one pass saw and did.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    pub scanned: usize,
    pub verdicts: Vec<Verdict>,
    /// Pids still alive after SIGKILL (should stay empty).
    pub survivors: Vec<u32>,
    /// What became of a dead supervisor's cgroup subtree, if there was one.
    pub cgroup_note: Option<String>,
}

impl Reaper {
    pub(crate) fn new(root: PathBuf, policy: Policy, grace: Duration) -> Reaper {
        Reaper {
            root,
            policy,
            grace,
            history: CpuHistory::default(),
            started: Instant::now(),
        }
    }

    /// The live supervisor of this root, if any.
    fn supervisor(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.root.join("run/supervisor.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        procfs::stat(pid).filter(|s| !s.is_zombie()).map(|_| pid)
    }

    /// Decides without acting.
    pub(crate) fn plan(&mut self) -> Pass {
        let mut procs = snapshot(&self.root);
        let current = self.supervisor();
        // Read after the snapshot: any process in it was spawned before this list was read.
        if let Some(live) = current.and_then(|_| live_units(&self.root)) {
            for p in procs
                .iter_mut()
                .filter(|p| p.in_tree && p.supervisor_pid == current)
            {
                p.unit_live = Some(match (&p.job_id, &p.daemon) {
                    (Some(job), _) => live.contains(&format!("job {job}")),
                    (None, Some(d)) => live.contains(d),
                    (None, None) => true,
                });
            }
        }
        let now_unix = ringrift::timefmt::unix_now().0;
        let verdicts = reaper::decide(
            &procs,
            current,
            std::process::id(),
            now_unix,
            self.started.elapsed().as_secs_f64(),
            &mut self.history,
            &self.policy,
        );
        Pass {
            scanned: procs.iter().filter(|p| p.in_tree).count(),
            verdicts,
            survivors: Vec::new(),
            cgroup_note: None,
        }
    }

    /// The cgroup subtree the supervisor recorded in run/cgroup, if the directory exists.
    fn subtree(&self) -> Option<PathBuf> {
        let text =
            std::fs::read_to_string(self.root.join("run").join(cgroupfs::RECORD_FILE)).ok()?;
        let dir = PathBuf::from(text.trim());
        (dir.is_absolute() && dir.is_dir()).then_some(dir)
    }

    /// The cgroup of `pid` when it is a daemon's or job's cgroup in the recorded subtree.
    fn cgroup_of(&self, subtree: &Path, pid: u32) -> Option<PathBuf> {
        let name = subtree.file_name()?.to_str()?;
        let path = cgroupfs::of_pid(pid)?;
        let (_, leaf) = path.rsplit_once(&format!("/{name}/"))?;
        (!leaf.contains('/') && (leaf.starts_with("daemon-") || leaf.starts_with("job-")))
            .then(|| subtree.join(leaf))
    }

    /// One pass: decide, then stop what was decided, waiting up to the grace period between
    /// SIGTERM and SIGKILL.
    pub(crate) async fn run_pass(&mut self) -> Pass {
        let mut pass = self.plan();
        for v in &pass.verdicts {
            match v.action {
                Action::Kill { group } => {
                    send(v.pid, group, Signal::SIGTERM);
                }
                Action::NotifyParent { parent } => {
                    let _ = kill(Pid::from_raw(parent as i32), Signal::SIGCHLD);
                }
            }
        }
        let targets: Vec<&Verdict> = pass
            .verdicts
            .iter()
            .filter(|v| matches!(v.action, Action::Kill { .. }))
            .collect();
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline && targets.iter().any(|v| !gone_or_zombie(v.pid)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let subtree = self.subtree();
        for v in &targets {
            if let Action::Kill { group } = v.action
                && !gone_or_zombie(v.pid)
            {
                // The whole cgroup first: whatever else it holds is of the same daemon or job.
                if let Some(dir) = subtree.as_ref().and_then(|s| self.cgroup_of(s, v.pid)) {
                    let _ = cgroupfs::kill(&dir);
                }
                send(v.pid, group, Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && targets.iter().any(|v| !gone_or_zombie(v.pid)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pass.survivors = targets
            .iter()
            .filter(|v| !gone_or_zombie(v.pid))
            .map(|v| v.pid)
            .collect();
        // A dead supervisor's subtree: kill what is left in it and remove it.
        if self.supervisor().is_none()
            && let Some(dir) = subtree
        {
            cgroupfs::kill_tree(&dir);
            pass.cgroup_note = Some(match cgroupfs::remove_tree(&dir, Duration::from_secs(2)) {
                Ok(()) => {
                    let _ = std::fs::remove_file(self.root.join("run").join(cgroupfs::RECORD_FILE));
                    format!(
                        "removed the cgroup subtree {} of a supervisor that is gone",
                        dir.display()
                    )
                }
                Err(e) => e.to_string(),
            });
        }
        pass
    }
}

fn send(pid: u32, group: Option<u32>, sig: Signal) {
    match group {
        Some(g) => {
            let _ = killpg(Pid::from_raw(g as i32), sig);
        }
        None => {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }
}

fn gone_or_zombie(pid: u32) -> bool {
    procfs::stat(pid).is_none_or(|s| s.is_zombie())
}

/// One line per verdict, for logs and the CLI.
pub(crate) fn describe(v: &Verdict, dry_run: bool) -> String {
    let what = match (&v.action, dry_run) {
        (Action::Kill { group: Some(g) }, true) => {
            format!("would kill pid {} (process group {g})", v.pid)
        }
        (Action::Kill { group: None }, true) => format!("would kill pid {}", v.pid),
        (Action::Kill { group: Some(g) }, false) => {
            format!("killed pid {} (process group {g})", v.pid)
        }
        (Action::Kill { group: None }, false) => format!("killed pid {}", v.pid),
        (Action::NotifyParent { parent }, true) => {
            format!("would notify parent {parent} of zombie {}", v.pid)
        }
        (Action::NotifyParent { parent }, false) => {
            format!("notified parent {parent} of zombie {}", v.pid)
        }
    };
    format!(
        "{what}: {}; age {:.0}s; command: {}",
        v.reason, v.age_secs, v.cmd
    )
}

/// The daemons (by name) and jobs (`job <id>`) the supervisor lists as running in run/processes
/// (`pgid start_time what` lines), or None when the list cannot be read.
fn live_units(root: &Path) -> Option<std::collections::BTreeSet<String>> {
    let text = std::fs::read_to_string(root.join("run/processes")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.splitn(3, ' ').nth(2))
            .map(str::to_string)
            .collect(),
    )
}

/// Every process, with the tree markers read from its environment.
pub(crate) fn snapshot(root: &Path) -> Vec<TreeProc> {
    let root_text = root.display().to_string();
    let ticks = procfs::ticks_per_sec() as f64;
    let uptime = procfs::uptime_secs().unwrap_or(0.0);
    let mut out = Vec::new();
    for pid in procfs::pids() {
        let Some(stat) = procfs::stat(pid) else {
            continue;
        };
        let env = procfs::environ(pid).unwrap_or_default();
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let supervisor_pid = var(SUPERVISOR_PID_ENV).and_then(|v| v.parse().ok());
        // Both markers: the root, and a supervisor that spawned it (a shell that merely has
        // RINGRIFT_ROOT set, like the CLI itself, is not part of the tree).
        let in_tree =
            var(ROOT_ENV).as_deref() == Some(root_text.as_str()) && supervisor_pid.is_some();
        let job_id = var(JOB_ID_ENV);
        let output_age_secs = job_id.as_ref().and_then(|id| {
            let meta = std::fs::metadata(root.join("logs/jobs").join(format!("{id}.log"))).ok()?;
            meta.modified()
                .ok()?
                .elapsed()
                .ok()
                .map(|d| d.as_secs_f64())
        });
        let daemon = var(DAEMON_ENV);
        out.push(TreeProc {
            daemon,
            unit_live: None,
            pid,
            ppid: stat.ppid,
            pgid: stat.pgid,
            state: stat.state,
            cpu_ticks: stat.cpu_ticks,
            start_time: stat.start_time,
            age_secs: (uptime - stat.start_time as f64 / ticks).max(0.0),
            cmd: if in_tree {
                procfs::cmdline(pid)
            } else {
                String::new()
            },
            in_tree,
            supervisor_pid,
            job_deadline: var(JOB_DEADLINE_ENV).and_then(|v| v.parse().ok()),
            job_stuck_after: var(JOB_STUCK_AFTER_ENV).and_then(|v| v.parse().ok()),
            job_id,
            output_age_secs,
        });
    }
    out
}

/// `ringrift-worker reap`: one pass now, printed.
pub(crate) fn main(args: ReapArgs) -> std::process::ExitCode {
    let root = std::path::absolute(&args.root).unwrap_or(args.root.clone());
    let mut reaper = Reaper::new(
        root,
        Policy {
            stuck_after_secs: args.stuck_after,
        },
        Duration::from_secs_f64(args.grace),
    );
    let pass = if args.dry_run {
        reaper.plan()
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(reaper.run_pass())
    };
    println!(
        "{} {} process(es) of the tree under {}: {} to act on",
        if args.dry_run {
            "dry run: scanned"
        } else {
            "scanned"
        },
        pass.scanned,
        reaper.root.display(),
        pass.verdicts.len()
    );
    for v in &pass.verdicts {
        println!("{}", describe(v, args.dry_run));
    }
    if let Some(note) = &pass.cgroup_note {
        println!("{note}");
    }
    if pass.survivors.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("still alive after SIGKILL: {:?}", pass.survivors);
        std::process::ExitCode::FAILURE
    }
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReapArgs {
    /// The root whose tree to scan
    #[arg(long, env = "RINGRIFT_ROOT", default_value = ".")]
    pub root: PathBuf,
    /// Print what would be stopped, stop nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds without CPU time and output after which a job is stuck
    #[arg(long, default_value_t = 600.0)]
    pub stuck_after: f64,
    /// Seconds between SIGTERM and SIGKILL
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,
}

/// The JOB_REAPED payload for one verdict.
fn reaped_payload(v: &Verdict, dry_run: bool) -> Value {
    let job_id = match &v.reason {
        reaper::Reason::OverdueJob { job_id, .. } | reaper::Reason::Stuck { job_id, .. } => {
            Value::from(job_id.clone())
        }
        _ => Value::Null,
    };
    ringrift::events::payload([
        ("pid", Value::from(v.pid)),
        ("reason", Value::from(v.reason.to_string())),
        ("command", Value::from(v.cmd.clone())),
        ("age_secs", Value::from((v.age_secs * 10.0).round() / 10.0)),
        ("job_id", job_id),
        ("dry_run", Value::from(dry_run)),
    ])
}

/// The `job_reaper` daemon: one reaper pass per cycle.
#[derive(Default)]
pub(crate) struct JobReaperDaemon {
    reaper: Option<Reaper>,
    ctx: Option<crate::runtime::Ctx>,
    dry_run: bool,
    killed: u64,
    passes: u64,
}

impl JobReaperDaemon {
    fn report(&self, message: String, healthy: bool) -> Report {
        Report::new(
            healthy,
            message,
            BTreeMap::from([
                ("passes".to_string(), Value::from(self.passes)),
                ("killed".to_string(), Value::from(self.killed)),
                ("dry_run".to_string(), Value::from(self.dry_run)),
            ]),
            [("passes", self.passes), ("killed", self.killed)],
        )
    }
}

impl Daemon for JobReaperDaemon {
    fn name(&self) -> &str {
        "job_reaper"
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let root = std::env::var_os(ROOT_ENV)
                .map(PathBuf::from)
                .context("RINGRIFT_ROOT is not set")?;
            let s = crate::pipeline::typed(settings, ringrift::settings::ReaperSettings::from_map)?;
            self.dry_run = s.dry_run;
            let policy = Policy {
                stuck_after_secs: s.stuck_after.as_secs_f64(),
            };
            let grace = s.reap_grace;
            println!(
                "job_reaper: watching {} (stuck after {}s, grace {:?}{})",
                root.display(),
                policy.stuck_after_secs,
                grace,
                if self.dry_run { ", dry run" } else { "" }
            );
            self.reaper = Some(Reaper::new(root, policy, grace));
            Ok(self.report("no pass yet".into(), true))
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            let dry_run = self.dry_run;
            let reaper = self.reaper.as_mut().expect("started");
            let pass = if dry_run {
                reaper.plan()
            } else {
                reaper.run_pass().await
            };
            for v in &pass.verdicts {
                println!("job_reaper: {}", describe(v, dry_run));
                if let Some(ctx) = &self.ctx {
                    ctx.emit("JOB_REAPED", reaped_payload(v, dry_run));
                }
            }
            self.passes += 1;
            if !dry_run {
                self.killed += pass
                    .verdicts
                    .iter()
                    .filter(|v| matches!(v.action, Action::Kill { .. }))
                    .count() as u64;
            }
            let when = ringrift::timefmt::now_rfc3339();
            let message = format!(
                "last pass {when}: {} process(es) in the tree, {} acted on{}",
                pass.scanned,
                pass.verdicts.len(),
                if pass.survivors.is_empty() {
                    String::new()
                } else {
                    format!(", {} survived SIGKILL", pass.survivors.len())
                }
            );
            self.report(message, pass.survivors.is_empty())
        })
    }
}
