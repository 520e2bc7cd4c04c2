//! Jobs: commands a daemon asks the supervisor to run (`spawn_job`). The supervisor owns them like
//! daemons — own process group, parent-death signal, output in logs/jobs/<id>.log — stops them at
//! their maximum runtime, and tells the daemon how they ended.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringrift::protocol::{self, FromSupervisor, JobStatus};

use super::{Core, Msg};
use crate::containment::{Member, Unit};
use crate::logwriter::{self, RotatingFile};
use crate::unix::{self, SpawnSpec};

pub(crate) struct Job {
    pub id: String,
    pub daemon: String,
    pub request_id: u64,
    pub pid: u32,
    pub command: Vec<String>,
    pub started: Instant,
    pub max_runtime: Duration,
    pub grace: Duration,
    pub timed_out: bool,
    /// The leader exited; SIGKILL went to the rest of the group, waiting for it to empty.
    pub exited: Option<(bool, Option<i32>, String)>,
    /// Every process of the job: its cgroup, or its group + environment.
    pub unit: Unit,
    /// The shared work queue's item it runs, if any.
    pub work_item: Option<i64>,
    /// The spawn of the daemon whose process asked for it: only that process hears how it ends
    /// (a restarted worker numbers its requests from 1 again).
    pub generation: u64,
    /// Times its unit was found still populated after the leader exited.
    pub drain_checks: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobTimer {
    Deadline,
    Grace,
    DrainCheck,
}

impl Core {
    pub(super) fn spawn_job(
        &mut self,
        daemon: &str,
        request_id: u64,
        command: Vec<String>,
        max_runtime_secs: f64,
        env: std::collections::BTreeMap<String, String>,
        work_item: Option<i64>,
    ) {
        let reply = |core: &Core, frame: FromSupervisor| {
            if let Some(tx) = core.daemons.get(daemon).and_then(|d| d.conn()) {
                let _ = tx.send(frame);
            }
        };
        let refuse = |core: &Core, why: String| {
            core.log.warn(&format!("{daemon}: job refused: {why}"));
            reply(
                core,
                FromSupervisor::JobExit {
                    request_id,
                    job_id: String::new(),
                    success: false,
                    code: None,
                    exit: why,
                    timed_out: false,
                    runtime_secs: 0.0,
                },
            );
        };
        if command.is_empty() {
            return refuse(self, "the job's command is empty".into());
        }
        if !(max_runtime_secs.is_finite() && max_runtime_secs > 0.0) {
            return refuse(
                self,
                format!("max_runtime_secs must be positive, got {max_runtime_secs}"),
            );
        }
        self.job_seq += 1;
        let id = format!(
            "{daemon}-{}-{:04}",
            ringrift::timefmt::unix_now().0,
            self.job_seq
        );
        let log_path: PathBuf = self.paths.logs_dir.join("jobs").join(format!("{id}.log"));
        let log = match RotatingFile::open(
            &log_path,
            self.config.logs.max_bytes,
            self.config.logs.max_files,
        ) {
            Ok(f) => Arc::new(Mutex::new(f)),
            Err(e) => return refuse(self, format!("cannot open {}: {e}", log_path.display())),
        };
        let max_runtime = Duration::from_secs_f64(max_runtime_secs.min(30.0 * 86_400.0));
        let deadline_unix =
            ringrift::timefmt::unix_now().0 + max_runtime.as_secs_f64().ceil() as u64;
        let mut spawn_env = self.tree_env();
        spawn_env.push((protocol::DAEMON_ENV.into(), daemon.to_string()));
        spawn_env.push((protocol::JOB_ID_ENV.into(), id.clone()));
        spawn_env.push((protocol::JOB_DEADLINE_ENV.into(), deadline_unix.to_string()));
        spawn_env.extend(env);
        let program = PathBuf::from(&command[0]);
        let root = self.paths.root.clone();
        let job_limits = self
            .daemons
            .get(daemon)
            .map(|d| d.cfg.job_limits)
            .unwrap_or_default();
        let prepared = self
            .containment
            .prepare(&Member::Job(id.clone()), &job_limits);
        let spec = SpawnSpec {
            program: &program,
            args: &command[1..],
            cwd: &root,
            env: spawn_env,
            pass_fd: None,
            cgroup_procs: prepared.procs.as_ref().map(|f| f.as_raw_fd()),
        };
        let mut child = match unix::spawn(&spec) {
            Ok(c) => c,
            Err(e) => {
                if let Some(dir) = &prepared.cgroup {
                    let _ = crate::cgroup::remove(dir);
                }
                return refuse(self, format!("cannot spawn {}: {e}", program.display()));
            }
        };
        let pid = child.id().expect("a just-spawned child has a pid");
        self.owned.insert(pid);
        let unit = self
            .containment
            .unit(Member::Job(id.clone()), pid, prepared);
        if let Some(why) = &unit.why_not {
            self.log
                .warn(&format!("job {id}: not contained by a cgroup: {why}"));
        }
        for p in &unit.limit_problems {
            self.log.warn(&format!("job {id}: {p}"));
        }
        if let Some(out) = child.stdout.take() {
            tokio::spawn(logwriter::pump(out, logwriter::Stream::Out, log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(logwriter::pump(err, logwriter::Stream::Err, log));
        }
        let (tx, owned, job_id) = (self.tx.clone(), self.owned.clone(), id.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            owned.remove(pid);
            let _ = tx.send(Msg::JobExited { job_id, status });
        });
        self.log.info(&format!(
            "{daemon}: job {id} started: pid {pid}, max runtime {max_runtime:?}: {}",
            command.join(" ")
        ));
        let grace = self
            .daemons
            .get(daemon)
            .map(|d| d.cfg.grace_period)
            .unwrap_or(Duration::from_secs(10));
        self.record_processes_later();
        self.jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                daemon: daemon.to_string(),
                request_id,
                pid,
                command,
                started: Instant::now(),
                max_runtime,
                grace,
                timed_out: false,
                exited: None,
                unit,
                work_item,
                generation: self.daemons.get(daemon).map_or(0, |d| d.generation),
                drain_checks: 0,
            },
        );
        if let Some(item) = work_item {
            self.work_cmd(crate::cluster::work::Cmd::Job {
                item,
                daemon: daemon.to_string(),
                job: id.clone(),
                running: true,
            });
        }
        self.job_timer(&id, JobTimer::Deadline, max_runtime);
        reply(
            self,
            FromSupervisor::JobStarted {
                request_id,
                job_id: id,
                pid,
            },
        );
    }

    fn job_timer(&self, id: &str, kind: JobTimer, after: Duration) {
        let (tx, job_id) = (self.tx.clone(), id.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Msg::JobTimer { job_id, kind });
        });
    }

    pub(super) fn on_job_timer(&mut self, id: &str, kind: JobTimer) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        match kind {
            JobTimer::Deadline if job.exited.is_none() => {
                job.timed_out = true;
                self.log.warn(&format!(
                    "job {id}: over its max runtime of {:?}: SIGTERM to process group {}, SIGKILL in {:?}",
                    job.max_runtime, job.pid, job.grace
                ));
                job.unit.signal(Signal::SIGTERM);
                let grace = job.grace;
                self.job_timer(id, JobTimer::Grace, grace);
            }
            JobTimer::Deadline => {}
            JobTimer::Grace => {
                if job.unit.alive() {
                    self.log.warn(&format!(
                        "job {id}: still running after the grace period: SIGKILL to process group {} and every process it started ({})",
                        job.pid,
                        job.unit.kind()
                    ));
                    job.unit.kill();
                }
            }
            JobTimer::DrainCheck => self.check_job_drained(id),
        }
    }

    /// Hands the shared work queue's task a command; false when this node has no such task (not
    /// in a cluster, or not on the bus yet).
    pub(super) fn work_cmd(&self, cmd: crate::cluster::work::Cmd) -> bool {
        let tx = self
            .work
            .as_ref()
            .and_then(|slot| slot.lock().expect("work slot lock").clone());
        tx.is_some_and(|tx| tx.send(cmd).is_ok())
    }

    /// The claim of shared work item `item` was lost: whatever job runs it stops.
    pub(super) fn work_lost(&mut self, item: i64) {
        let ids: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.work_item == Some(item))
            .map(|j| j.id.clone())
            .collect();
        for id in ids {
            self.log.warn(&format!(
                "job {id}: stopped: this node lost the claim of work item {item}"
            ));
            self.stop_job(&id);
        }
    }

    /// Stops a job now (SIGTERM, then SIGKILL after its grace period).
    pub(super) fn stop_job(&mut self, id: &str) {
        let Some(job) = self.jobs.get(id) else { return };
        if job.exited.is_none() {
            job.unit.signal(Signal::SIGTERM);
            let grace = job.grace;
            self.job_timer(id, JobTimer::Grace, grace);
        }
    }

    pub(super) fn on_job_exited(
        &mut self,
        id: &str,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let (success, code, exit) = match &status {
            Ok(s) => (
                s.success() && !job.timed_out,
                s.code(),
                unix::describe_exit(s),
            ),
            Err(e) => (false, None, format!("wait failed: {e}")),
        };
        job.exited = Some((success, code, exit));
        // Whatever the job left behind goes with it.
        if job.unit.alive() {
            job.unit.kill();
        }
        self.check_job_drained(id);
    }

    fn check_job_drained(&mut self, id: &str) {
        let Some(job) = self.jobs.get(id) else { return };
        if job.exited.is_none() {
            return;
        }
        if job.unit.alive() {
            // A cgroup usually empties within a millisecond or two of its last process's exit:
            // look again soon, then every 20 ms (the slot waits for this).
            let checks = job.drain_checks;
            let wait = Duration::from_millis(1 << checks.min(4)).min(Duration::from_millis(20));
            if let Some(job) = self.jobs.get_mut(id) {
                job.drain_checks += 1;
            }
            self.job_timer(id, JobTimer::DrainCheck, wait);
            return;
        }
        let job = self.jobs.remove(id).expect("present");
        if let Some(item) = job.work_item {
            self.work_cmd(crate::cluster::work::Cmd::Job {
                item,
                daemon: job.daemon.clone(),
                job: job.id.clone(),
                running: false,
            });
        }
        if let Err(e) = job.unit.remove() {
            self.log.warn(&format!("job {id}: {e}"));
        }
        let (success, code, exit) = job.exited.clone().expect("checked");
        let runtime = job.started.elapsed();
        let exit = if job.timed_out {
            format!("timed out after {:?} ({exit})", job.max_runtime)
        } else {
            exit
        };
        self.log.info(&format!(
            "{}: job {id} ended after {:.3}s: {exit}",
            job.daemon,
            runtime.as_secs_f64()
        ));
        // Only the process that asked: another (a restart) would take it for a job of its own.
        if let Some(tx) = self
            .daemons
            .get(&job.daemon)
            .filter(|d| d.generation == job.generation)
            .and_then(|d| d.conn())
        {
            let _ = tx.send(FromSupervisor::JobExit {
                request_id: job.request_id,
                job_id: job.id.clone(),
                success,
                code,
                exit,
                timed_out: job.timed_out,
                runtime_secs: runtime.as_secs_f64(),
            });
        }
        self.record_processes_later();
        self.prune_job_logs();
    }

    /// Deletes the ended jobs' logs that `logs.job_logs_*` no longer keeps
    /// ([`ringrift::retention`]); a running job's log is never touched. At most once a second
    /// (a directory of a thousand files is read each time): a prune asked for sooner is deferred
    /// to the end of that second.
    pub(super) fn prune_job_logs(&mut self) {
        const EVERY: Duration = Duration::from_secs(1);
        let now = Instant::now();
        if let Some(last) = self.job_logs_pruned
            && now.duration_since(last) < EVERY
        {
            if !self.job_logs_prune_due {
                self.job_logs_prune_due = true;
                let tx = self.tx.clone();
                let wait = EVERY - now.duration_since(last);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Msg::PruneJobLogs);
                });
            }
            return;
        }
        self.job_logs_pruned = Some(now);
        let dir = self.paths.logs_dir.join("jobs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut files = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `<job id>.log` and its rotations `<job id>.log.N`.
            let Some((job, _)) = name.split_once(".log") else {
                continue;
            };
            if self.jobs.contains_key(job) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            files.push(ringrift::retention::File {
                id: name,
                modified,
                bytes: meta.len(),
            });
        }
        let limits = self.config.logs.job_logs;
        let gone = ringrift::retention::expired(&files, &limits, ringrift::timefmt::unix_now().0);
        let removed = gone
            .iter()
            .filter(|name| std::fs::remove_file(dir.join(name)).is_ok())
            .count();
        if removed > 0 {
            self.log.info(&format!(
                "logs/jobs: removed {removed} old job log file(s) (logs.job_logs_keep {}, \
                 job_logs_max_age {}, job_logs_max_bytes {})",
                limits.keep,
                humantime::format_duration(limits.max_age),
                limits.max_bytes
            ));
        }
    }

    pub(super) fn job_statuses(&self) -> Vec<JobStatus> {
        self.jobs
            .values()
            .filter(|j| j.exited.is_none())
            .map(|j| JobStatus {
                id: j.id.clone(),
                daemon: j.daemon.clone(),
                pid: j.pid,
                command: j.command.clone(),
                runtime_secs: (j.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                max_runtime_secs: j.max_runtime.as_secs_f64(),
                work_item: j.work_item,
            })
            .collect()
    }
}
