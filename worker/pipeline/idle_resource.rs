//! idle_resource: turns a node's idle time into extra selfplay.
//!
//! Each cycle it samples CPU utilisation from /proc/stat (the busy share of all CPU time since the
//! previous sample, [`cpu_percent`](ringrift::procfs::cpu_percent)) and, where `nvidia-smi` exists, GPU utilisation (the busiest
//! GPU). Once utilisation has stayed under `cpu_threshold` percent for `idle_window` seconds
//! ([`IdleTracker`]), it announces IDLE_RESOURCE_DETECTED and runs up to `max_extra_jobs` selfplay
//! jobs (no more than the node's selfplay slots selfplay_scheduler leaves free:
//! `pipeline.capacity.selfplay_slots`, shared through [`super::slots`]) of `games_per_job` games for the key the scheduler rates highest (priorities.json; the
//! first config key without one), announcing their games like the scheduler does. The idle window
//! then starts over, measured from after the jobs, so it never counts its own jobs' quiet ends.
//!
//! On a node in a cluster the extra jobs are the cluster's own: up to `max_extra_jobs` pending
//! selfplay items of the shared work queue, claimed, run and settled as selfplay_scheduler does
//! (so an idle node takes more of the cluster's work, and nothing is played that the leader did
//! not queue by priority). An idle node with nothing pending runs nothing.
//!
//! It keeps no state file: an idle window is about the present, and restarting it is harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ringrift::events::payload;
use ringrift::procfs::{self, CpuTimes, cpu_percent};
use serde_json::Value;

use super::games_db::Quarantined;
use super::selfplay_scheduler::{
    Announcer, SELFPLAY_SLOTS, SelfplayRun, keep_quarantined, read_priorities, run_and_settle,
    runnable,
};
use super::work::{Queue, work_failed};
use super::{Pipeline, join_all, now_secs, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::IdleSettings;
use ringrift::work_queue::{Attempt, SELFPLAY};

const NAME: &str = "idle_resource";

/// How long `nvidia-smi` may take.
const GPU_QUERY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- sampling (pure)

/// The busiest GPU's utilisation from `nvidia-smi --query-gpu=utilization.gpu
/// --format=csv,noheader,nounits` (one number per GPU per line).
pub(crate) fn parse_gpu_utilisation(text: &str) -> Result<f64> {
    let mut max: Option<f64> = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let v: f64 = line
            .parse()
            .with_context(|| format!("unexpected nvidia-smi output {line:?}"))?;
        max = Some(max.map_or(v, |m: f64| m.max(v)));
    }
    max.context("nvidia-smi listed no GPU")
}

/// How long the node has been idle, from utilisation samples each covering `[start, end]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct IdleTracker {
    idle_since: Option<f64>,
}

impl IdleTracker {
    /// Adds a sample; returns the seconds the node has been idle without a break (0 when busy).
    pub(crate) fn observe(&mut self, start: f64, end: f64, idle: bool) -> f64 {
        if !idle {
            self.idle_since = None;
            return 0.0;
        }
        let since = *self.idle_since.get_or_insert(start);
        (end - since).max(0.0)
    }

    pub(crate) fn reset(&mut self) {
        self.idle_since = None;
    }
}

/// The key to spend idle time on: the highest priority among the pipeline's keys, else the first.
pub(crate) fn pick_key(
    keys: &[String],
    priorities: Option<&BTreeMap<String, f64>>,
) -> Option<String> {
    let best = priorities.and_then(|p| {
        keys.iter()
            .filter_map(|k| p.get(k).filter(|v| v.is_finite()).map(|v| (k, *v)))
            .fold(None::<(&String, f64)>, |best, (k, v)| match best {
                Some((_, b)) if b >= v => best,
                _ => Some((k, v)),
            })
    });
    best.map(|(k, _)| k.clone())
        .or_else(|| keys.first().cloned())
}

// ---------------------------------------------------------------- the daemon

fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

async fn query_gpu(program: &Path) -> Result<f64> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args([
        "--query-gpu=utilization.gpu",
        "--format=csv,noheader,nounits",
    ])
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(GPU_QUERY_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("nvidia-smi did not answer within {GPU_QUERY_TIMEOUT:?}"))?
        .context("cannot run nvidia-smi")?;
    if !out.status.success() {
        bail!(
            "nvidia-smi failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_gpu_utilisation(&String::from_utf8_lossy(&out.stdout))
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    samples: u64,
    idle_detections: u64,
    jobs_started: u64,
    jobs_succeeded: u64,
    jobs_failed: u64,
    games_added: u64,
    dbs_quarantined: u64,
}

pub(crate) struct IdleResource {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    cpu_threshold: f64,
    idle_window: f64,
    max_extra_jobs: u64,
    games_per_job: u64,
    /// Seconds before a failed shared-queue item comes back (doubling): the cycle interval.
    retry_backoff: f64,
    nvidia_smi: Option<PathBuf>,
    prev: Option<(f64, CpuTimes)>,
    tracker: IdleTracker,
    cpu: Option<f64>,
    gpu: Option<f64>,
    idle_for: f64,
    totals: Totals,
    /// Sampling problems of the last cycle.
    problems: Vec<String>,
    /// The last extra-selfplay burst: when and what became of it.
    last_burst: Option<String>,
    /// The last failed extra job, until one succeeds.
    last_failure: Option<String>,
    /// Games DBs moved aside by this process, the latest last.
    quarantined: Vec<Quarantined>,
    /// Games DB problems of the last burst.
    db_problems: Vec<String>,
}

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(IdleResource {
        ctx: None,
        pipeline: None,
        cpu_threshold: 50.0,
        idle_window: 120.0,
        max_extra_jobs: 1,
        games_per_job: 50,
        retry_backoff: 60.0,
        nvidia_smi: None,
        prev: None,
        tracker: IdleTracker::default(),
        cpu: None,
        gpu: None,
        idle_for: 0.0,
        totals: Totals::default(),
        problems: Vec::new(),
        last_burst: None,
        last_failure: None,
        quarantined: Vec::new(),
        db_problems: Vec::new(),
    })
}

impl IdleResource {
    /// Takes a CPU (and GPU) sample; true when the idle window is complete.
    async fn sample(&mut self) -> bool {
        self.problems.clear();
        let now = now_secs();
        let reading = procfs::cpu_times();
        let cur = match reading {
            Ok(cur) => cur,
            Err(e) => {
                self.problems.push(format!("{e:#}"));
                self.tracker.reset();
                return false;
            }
        };
        self.totals.samples += 1;
        self.gpu = None;
        if let Some(program) = &self.nvidia_smi {
            match query_gpu(program).await {
                Ok(g) => self.gpu = Some(g),
                Err(e) => self.problems.push(format!("GPU: {e:#} (CPU only)")),
            }
        }
        let Some((start, prev)) = self.prev.replace((now, cur)) else {
            return false;
        };
        let Some(cpu) = cpu_percent(&prev, &cur) else {
            return false;
        };
        self.cpu = Some(cpu);
        let idle = cpu < self.cpu_threshold && self.gpu.is_none_or(|g| g < self.cpu_threshold);
        self.idle_for = self.tracker.observe(start, now, idle);
        idle && self.idle_for >= self.idle_window
    }

    async fn burst(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        let ctx = self.ctx.as_ref().expect("attached");
        // (shared queue item, key, games) per job.
        let mut work: Vec<(Option<i64>, String, u64)> = Vec::new();
        // The extra jobs take the node's free selfplay slots, the ones selfplay_scheduler does
        // not hold: together they never run more than `pipeline.capacity.selfplay_slots`.
        let capacity = pipeline.capacity.selfplay_slots;
        let held: Vec<super::slots::Slot> =
            std::iter::from_fn(|| super::slots::try_take(&pipeline.root, SELFPLAY_SLOTS, capacity))
                .take(usize::try_from(self.max_extra_jobs).unwrap_or(usize::MAX))
                .collect();
        if held.is_empty() {
            let busy = format!(
                "idle, but no extra selfplay: all {capacity} selfplay slot(s) of the node are busy"
            );
            if self.last_burst.as_ref() != Some(&busy) {
                println!("{NAME}: {busy}");
            }
            self.last_burst = Some(busy);
            return;
        }
        let queue = pipeline.shared_queue.then(|| Queue::Shared(ctx.clone()));
        if let Some(queue) = &queue {
            if let Err(why) = super::work::may_claim(&pipeline.root, SELFPLAY) {
                self.last_burst = Some(format!("idle, but no extra selfplay: {why}"));
                return;
            }
            // In a cluster the extra jobs are the cluster's pending selfplay items: the leader
            // weighs them by priority, and an idle node takes more of them.
            let now = now_secs();
            let items = match queue.claim(NAME, held.len(), now).await {
                Ok(items) => items,
                Err(e) => {
                    self.last_failure = Some(format!(
                        "{}: cannot claim from the shared queue: {e:#}",
                        ringrift::timefmt::now_rfc3339()
                    ));
                    return;
                }
            };
            for item in items {
                if let Some((key, games)) = runnable(NAME, queue, ctx, pipeline, &item, now).await {
                    work.push((Some(item.id), key, games));
                }
            }
            if work.is_empty() {
                let none = "idle, but the shared queue has no selfplay item ready".to_string();
                if self.last_burst.as_ref() != Some(&none) {
                    println!("{NAME}: {none}");
                }
                self.last_burst = Some(none);
                return;
            }
        } else {
            let priorities = read_priorities(pipeline).unwrap_or_else(|e| {
                eprintln!("{NAME}: {e:#}; using the first config key");
                None
            });
            let Some(key) = pick_key(&pipeline.config_keys, priorities.as_ref()) else {
                return;
            };
            for _ in 0..held.len() {
                work.push((None, key.clone(), self.games_per_job));
            }
        }
        let jobs = work.len() as u64;
        let keys: BTreeSet<&str> = work.iter().map(|(_, k, _)| k.as_str()).collect();
        let keys = keys.into_iter().collect::<Vec<_>>().join(", ");
        let cpu = self.cpu.unwrap_or(0.0);
        println!(
            "{NAME}: idle for {:.0}s (cpu {cpu:.1}%{}): starting {jobs} selfplay job(s) for {keys}{}",
            self.idle_for,
            self.gpu
                .map(|g| format!(", gpu {g:.0}%"))
                .unwrap_or_default(),
            if queue.is_some() {
                " from the shared queue"
            } else {
                ""
            }
        );
        self.totals.idle_detections += 1;
        ctx.emit(
            "IDLE_RESOURCE_DETECTED",
            payload([
                ("cpu_percent", ((cpu * 10.0).round() / 10.0).into()),
                ("gpu_percent", self.gpu.map_or(Value::Null, Value::from)),
                ("jobs_started", jobs.into()),
            ]),
        );
        let announcer = Announcer::new(NAME, pipeline, ctx);
        for (_, key, _) in &work {
            if let Err(e) = announcer.baseline(key) {
                eprintln!("{NAME}: {key}: cannot count games before the jobs: {e:#}");
            }
        }
        let backoff = self.retry_backoff;
        let futs: Vec<Pin<Box<dyn Future<Output = SelfplayRun> + '_>>> = work
            .iter()
            .enumerate()
            .map(
                |(i, (item, key, games))| -> Pin<Box<dyn Future<Output = SelfplayRun> + '_>> {
                    let (announcer, queue) = (&announcer, &queue);
                    Box::pin(async move {
                        let (Some(id), Some(queue)) = (item, queue) else {
                            return announcer.run(key, *games, 0x1d1e_0000 + i as u64).await;
                        };
                        let (run, attempt) =
                            run_and_settle(NAME, queue, announcer, *id, key, *games, backoff).await;
                        if let (Some(Attempt::Dead { attempts }), Err(e)) = (attempt, &run.result) {
                            work_failed(
                                ctx,
                                pipeline,
                                SELFPLAY,
                                *id,
                                key,
                                &e.to_string(),
                                attempts,
                            );
                        }
                        run
                    })
                },
            )
            .collect();
        let runs = join_all(futs).await;
        drop(held);
        let (quarantined, db_problems) = announcer.take_db_news();
        self.totals.dbs_quarantined += quarantined.len() as u64;
        keep_quarantined(&mut self.quarantined, quarantined);
        self.db_problems = db_problems;
        let (mut ok, mut failed, mut added) = (0, 0, 0);
        for run in &runs {
            added += run.new_games;
            match &run.result {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    self.last_failure = Some(format!("{}: {e}", ringrift::timefmt::now_rfc3339()));
                }
            }
        }
        if ok > 0 && failed == 0 {
            self.last_failure = None;
        }
        self.totals.jobs_started += jobs;
        self.totals.jobs_succeeded += ok;
        self.totals.jobs_failed += failed;
        self.totals.games_added += added;
        self.last_burst = Some(format!(
            "last extra selfplay {}: {jobs} job(s) for {keys}: {ok} ok, {failed} failed, {added} new games",
            ringrift::timefmt::now_rfc3339()
        ));
        // The window starts over from now: the time the jobs ran was not idle.
        self.tracker.reset();
        self.idle_for = 0.0;
        self.prev = procfs::cpu_times().ok().map(|c| (now_secs(), c));
    }

    fn report(&self) -> Report {
        let mut problems = self.problems.clone();
        if let Some(f) = &self.last_failure {
            problems.push(format!("last extra job failed {f}"));
        }
        problems.extend(self.db_problems.iter().cloned());
        let healthy = problems.is_empty();
        let sample = match self.cpu {
            None => "no utilisation sample yet".to_string(),
            Some(cpu) => format!(
                "cpu {cpu:.1}%, gpu {}; idle for {:.0}s of {:.0}s needed (threshold {}%)",
                match (self.gpu, &self.nvidia_smi) {
                    (Some(g), _) => format!("{g:.0}%"),
                    (None, Some(_)) => "unknown".into(),
                    (None, None) => "none (no nvidia-smi)".into(),
                },
                self.idle_for,
                self.idle_window,
                self.cpu_threshold
            ),
        };
        let mut message = sample;
        if let Some(b) = &self.last_burst {
            message.push_str("; ");
            message.push_str(b);
        }
        if let Some(q) = self.quarantined.last() {
            message = format!("{}; {message}", q.describe());
        }
        if !healthy {
            message = format!("{}; {message}", problems.join("; "));
        }
        let t = self.totals;
        Report::new(
            healthy,
            message,
            BTreeMap::from([
                (
                    "quarantined".to_string(),
                    Value::Array(self.quarantined.iter().map(Quarantined::to_json).collect()),
                ),
                (
                    "cpu_percent".to_string(),
                    self.cpu.map_or(Value::Null, Value::from),
                ),
                (
                    "gpu_percent".to_string(),
                    self.gpu.map_or(Value::Null, Value::from),
                ),
                ("idle_secs".to_string(), Value::from(self.idle_for)),
                (
                    "gpu_monitored".to_string(),
                    Value::from(self.nvidia_smi.is_some()),
                ),
            ]),
            [
                ("samples", t.samples),
                ("idle_detections", t.idle_detections),
                ("jobs_started", t.jobs_started),
                ("jobs_succeeded", t.jobs_succeeded),
                ("jobs_failed", t.jobs_failed),
                ("games_added", t.games_added),
                ("dbs_quarantined", t.dbs_quarantined),
            ],
        )
    }
}

impl Daemon for IdleResource {
    fn name(&self) -> &str {
        NAME
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, IdleSettings::from_map)?;
            self.cpu_threshold = s.cpu_threshold;
            self.idle_window = s.idle_window.as_secs_f64();
            self.max_extra_jobs = s.max_extra_jobs;
            self.retry_backoff = settings.interval_secs;
            self.games_per_job = s.games_per_job;
            self.nvidia_smi = find_program("nvidia-smi");
            println!(
                "{NAME}: idle = under {}% for {}s; then {} job(s) of {} games; GPU: {}",
                self.cpu_threshold,
                self.idle_window,
                self.max_extra_jobs,
                self.games_per_job,
                self.nvidia_smi
                    .as_ref()
                    .map_or("none (no nvidia-smi on PATH)".to_string(), |p| p
                        .display()
                        .to_string())
            );
            self.pipeline = Some(pipeline);
            // The first reading, so the first cycle already measures something.
            self.sample().await;
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            if self.sample().await && self.max_extra_jobs > 0 {
                self.burst().await;
            }
            self.report()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_output_gives_the_busiest_gpu() {
        assert_eq!(parse_gpu_utilisation("3\n 97 \n12\n").unwrap(), 97.0);
        assert!(parse_gpu_utilisation("").is_err());
        assert!(parse_gpu_utilisation("[N/A]\n").is_err());
    }

    #[test]
    fn idle_time_accumulates_until_a_busy_sample() {
        let mut t = IdleTracker::default();
        assert_eq!(t.observe(0.0, 60.0, true), 60.0);
        assert_eq!(t.observe(60.0, 120.0, true), 120.0);
        assert_eq!(t.observe(120.0, 180.0, false), 0.0);
        assert_eq!(
            t.observe(180.0, 240.0, true),
            60.0,
            "the window starts over"
        );
        t.reset();
        assert_eq!(t.observe(300.0, 310.0, true), 10.0);
    }

    #[test]
    fn the_highest_priority_key_is_picked() {
        let keys = vec!["hex8_2p".to_string(), "hex6_2p".to_string()];
        assert_eq!(pick_key(&keys, None).as_deref(), Some("hex8_2p"));
        let p = BTreeMap::from([("hex6_2p".to_string(), 0.9), ("hex8_2p".to_string(), 0.3)]);
        assert_eq!(pick_key(&keys, Some(&p)).as_deref(), Some("hex6_2p"));
        let other = BTreeMap::from([("square8_2p".to_string(), 0.9)]);
        assert_eq!(pick_key(&keys, Some(&other)).as_deref(), Some("hex8_2p"));
        assert_eq!(pick_key(&[], None), None);
    }
}
