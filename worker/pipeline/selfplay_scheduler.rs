//! selfplay_scheduler: decides which config key most needs selfplay, and runs the queued selfplay.
//!
//! Priorities: each cycle (and whenever a quality event arrives) every config key gets a priority
//! from the pure [`priority`]: how far its games DB is from `target_games`, how stale its canonical
//! model is against `staleness_hours` (no model = most stale), scaled down, never to zero, by the
//! latest quality score of its data. They go to `data/coordination/priorities.json`, which
//! queue_populator reads to weight the items it queues and idle_resource reads to pick a key.
//!
//! Running: each cycle keeps the node's selfplay slots (`pipeline.capacity.selfplay_slots`, each
//! job holding one of [`super::slots`], which idle_resource's extra jobs share) busy with
//! selfplay jobs from the work queue, claiming the next
//! item the moment a job ends (a pool, not rounds that wait for their slowest job), for as long
//! as items are ready, yielding to waiting events after a minute at least ([`POOL_BUDGET`]); each item ends completed or failed (with the job's exit). A successful
//! job emits SELFPLAY_COMPLETE, and whenever the games DB grew, NEW_GAMES_AVAILABLE carries the
//! games actually added (counted in the DB, not taken from the request). A cycle whose every job failed starts the retry schedule of [`super::retry`] (2 s doubling
//! to 5 min): no job is started before it is due, and health says `selfplay retrying in N s after:
//! <error>`; a job that succeeds or a games DB moved aside ends it. Quality scores survive restarts
//! in the state file; items a previous process of this daemon
//! held when it died are requeued at start-up.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use anyhow::Result;
use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::games_db::{Depth, Quarantined, ensure_usable};
use super::quality_monitor::{count_completed, count_since};
use super::retry::Failing;
use super::{Busy, Pipeline, load_state, now_secs, save_state, stage_reports, typed, view_details};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, JobOutcome, Settings};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use ringrift::pipeline_view::Stage;
use ringrift::settings::SchedulerSettings;
use ringrift::work_queue::{Attempt, Claimed, SELFPLAY};

use super::work::{Queue, work_failed};

const NAME: &str = "selfplay_scheduler";

/// The kind of the node's selfplay slots ([`super::slots`]), shared with idle_resource.
pub(crate) const SELFPLAY_SLOTS: &str = "selfplay";

/// The least time a cycle's pool goes on claiming before it yields to events that arrived
/// meanwhile (quality scores, promotions), letting its jobs end: its slots idle only while the
/// last jobs of a pool finish, at most once a minute and only when events wait.
pub(crate) const POOL_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the first cycle after a start waits for queue_populator's first items when the
/// local queue is empty (looking every [`FIRST_ITEMS_POLL`]): both daemons start together, and
/// the WORK_QUEUED that would wake the scheduler can go out before it has subscribed.
const FIRST_ITEMS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const FIRST_ITEMS_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the priorities go.
pub(crate) fn priorities_path(pipeline: &Pipeline) -> PathBuf {
    pipeline.root.join("data/coordination/priorities.json")
}

/// The priorities file, if there is one. An unreadable file is an error (the caller says so).
pub(crate) fn read_priorities(pipeline: &Pipeline) -> Result<Option<BTreeMap<String, f64>>> {
    let path = priorities_path(pipeline);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{} is unreadable: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// What the priority of a key is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KeyFacts {
    /// Completed games in its DB.
    pub completed: u64,
    /// Age of its canonical model in hours; `None` = no model yet.
    pub model_age_hours: Option<f64>,
    /// The latest quality score of its data, in [0, 1]; `None` = not scored yet.
    pub quality: Option<f64>,
}

/// A key's selfplay priority, in (0, 1]:
/// `(0.1 + 0.6·deficit + 0.3·staleness) · (0.25 + 0.75·quality)` where deficit = the missing share
/// of `target_games`, staleness = model age / `staleness_hours` capped at 1 (1 without a model) and
/// quality = 1 until scored. The 0.1 floor and the 0.25 quality floor keep every key above zero:
/// a key with plenty of data, a fresh model or bad data still gets some selfplay.
pub(crate) fn priority(f: &KeyFacts, target_games: f64, staleness_hours: f64) -> f64 {
    let deficit = if target_games > 0.0 {
        (1.0 - f.completed as f64 / target_games).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let staleness = match f.model_age_hours {
        None => 1.0,
        Some(_) if staleness_hours <= 0.0 => 1.0,
        Some(age) => (age.max(0.0) / staleness_hours).min(1.0),
    };
    let quality = f.quality.unwrap_or(1.0).clamp(0.0, 1.0);
    let p = (0.1 + 0.6 * deficit + 0.3 * staleness) * (0.25 + 0.75 * quality);
    (p * 10_000.0).round() / 10_000.0
}

/// A seed that differs between jobs, processes and runs.
fn seed(salt: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z =
        nanos ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finalizer
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A running job of a round: its item id and how it went.
type JobFuture<'a> = Pin<Box<dyn Future<Output = (i64, SelfplayRun)> + 'a>>;

/// Whether claimed `item` is a selfplay item this node can run: its key and games, or (after
/// rejecting it: set aside in the local queue, handed back in the shared one, WORK_FAILED once
/// no node could run it) None. `who` is the daemon that claimed it.
pub(crate) async fn runnable(
    who: &str,
    queue: &Queue,
    ctx: &Ctx,
    pipeline: &Pipeline,
    item: &Claimed,
    now: f64,
) -> Option<(String, u64)> {
    let problem = if item.item_type != SELFPLAY {
        format!("unknown item type {:?}", item.item_type)
    } else {
        match item.selfplay_spec() {
            Err(e) => format!("{e:#}"),
            Ok(spec) if !pipeline.config_keys.contains(&spec.config_key) => format!(
                "config key {} is not in pipeline.config_keys",
                spec.config_key
            ),
            Ok(spec) if spec.games == 0 => "asks for 0 games".to_string(),
            Ok(spec) => return Some((spec.config_key, spec.games)),
        }
    };
    eprintln!("{who}: work item {}: {problem}", item.id);
    // The other items of the batch are run whatever becomes of this one.
    let attempt = queue
        .reject(item.id, item.attempts, &problem, now)
        .await
        .unwrap_or_else(|e| {
            eprintln!("{who}: work item {}: cannot set it aside: {e:#}", item.id);
            None
        });
    // Set aside: said cluster-wide, when the item names a key to say it of.
    if let (Some(Attempt::Dead { attempts }), Ok(spec)) = (attempt, item.selfplay_spec()) {
        work_failed(
            ctx,
            pipeline,
            SELFPLAY,
            item.id,
            &spec.config_key,
            &problem,
            attempts,
        );
    }
    None
}

/// Runs selfplay item `id` (`games` games of `key`) and settles it as soon as its job ends, not
/// when the slowest of its batch does: done, or failed (back after `backoff` seconds, doubling,
/// or set aside after its last try; the caller says WORK_FAILED).
pub(crate) async fn run_and_settle(
    who: &str,
    queue: &Queue,
    announcer: &Announcer<'_>,
    id: i64,
    key: &str,
    games: u64,
    backoff: f64,
) -> (SelfplayRun, Option<Attempt>) {
    let shared = queue.is_shared().then_some(id);
    let run = announcer.run_item(key, games, id as u64, shared).await;
    let attempt = settle(who, queue, id, &run, backoff).await;
    (run, attempt)
}

/// Settles selfplay item `id` after its job: done, or failed (see [`run_and_settle`]).
pub(crate) async fn settle(
    who: &str,
    queue: &Queue,
    id: i64,
    run: &SelfplayRun,
    backoff: f64,
) -> Option<Attempt> {
    let settled = match &run.result {
        Ok(_) => queue.complete(id, now_secs()).await.map(|_| None),
        Err(e) => {
            queue
                .fail_attempt(id, &e.to_string(), now_secs(), backoff)
                .await
        }
    };
    settled.unwrap_or_else(|e| {
        eprintln!("{who}: cannot record the end of work item {id}: {e:#}");
        None
    })
}

/// How one selfplay job went.
#[derive(Debug, Clone)]
pub(crate) struct SelfplayRun {
    pub key: String,
    pub games: u64,
    /// `Err`: the job could not be started, failed or timed out.
    pub result: Result<JobOutcome, SelfplayFailure>,
    /// Games this run found added to the DB (see [`Announcer`]).
    pub new_games: u64,
    /// A problem counting the DB's games, if there was one.
    pub count_error: Option<String>,
}

/// How a selfplay job did not succeed, for logs, health and the work queue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum SelfplayFailure {
    /// The supervisor did not start it (the cause, with its chain).
    #[error("cannot start the selfplay job: {0}")]
    NotStarted(String),
    #[error("job {job_id} timed out after {secs:.0}s ({exit})")]
    TimedOut {
        job_id: String,
        secs: f64,
        exit: String,
    },
    /// `last_line` is `: <the job's last error line>`, or empty.
    #[error("job {job_id} failed: {exit}{last_line}")]
    Failed {
        job_id: String,
        exit: String,
        last_line: String,
    },
}

/// Runs selfplay jobs and announces their games. Games are counted in the DB before the jobs and
/// after each one ends; each job announces the growth since the previous announcement for its key,
/// so concurrent jobs on one key never announce the same game twice.
pub(crate) struct Announcer<'a> {
    /// The daemon running the jobs, for log lines.
    who: &'static str,
    pipeline: &'a Pipeline,
    ctx: &'a Ctx,
    /// Per key: the highest game id announced, and the completed games counted (once, at the
    /// baseline) plus those announced since. Counting only the games above the last id keeps a
    /// job's end cheap however large the DB, and right when retention deletes old games.
    announced: RefCell<BTreeMap<String, (i64, u64)>>,
    /// Games DBs this announcer moved aside (see [`Announcer::guard`]).
    quarantined: RefCell<Vec<Quarantined>>,
    /// Problems checking a games DB (busy, or damaged and immovable), for health.
    db_problems: RefCell<Vec<String>>,
}

impl<'a> Announcer<'a> {
    pub(crate) fn new(who: &'static str, pipeline: &'a Pipeline, ctx: &'a Ctx) -> Announcer<'a> {
        Announcer {
            who,
            pipeline,
            ctx,
            announced: RefCell::default(),
            quarantined: RefCell::default(),
            db_problems: RefCell::default(),
        }
    }

    /// Checks `key`'s games DB at `depth` and moves it aside if it is damaged
    /// ([`ensure_usable`]); a fresh DB starts from 0 games. True when it was moved.
    pub(crate) fn guard(&self, key: &str, depth: Depth) -> bool {
        match ensure_usable(self.pipeline, self.ctx, self.who, key, depth) {
            Ok(None) => false,
            Ok(Some(q)) => {
                self.quarantined.borrow_mut().push(q);
                self.announced.borrow_mut().insert(key.to_string(), (0, 0));
                true
            }
            Err(why) => {
                eprintln!("{}: {key}: {why}", self.who);
                self.db_problems.borrow_mut().push(why.to_string());
                false
            }
        }
    }

    /// The games DBs moved aside and the DB problems met so far, emptying both lists.
    pub(crate) fn take_db_news(&self) -> (Vec<Quarantined>, Vec<String>) {
        (self.quarantined.take(), self.db_problems.take())
    }

    /// Looks at `key`'s games DB's schema ([`Announcer::guard`]) and records its current game count (call
    /// before starting its jobs).
    pub(crate) fn baseline(&self, key: &str) -> Result<()> {
        if self.announced.borrow().contains_key(key) {
            return Ok(());
        }
        self.guard(key, Depth::Schema);
        let db = self.pipeline.games_db(key);
        let total = count_completed(&db, key)?.unwrap_or(0);
        let last = count_since(&db, key, 0)?.map_or(0, |(_, max)| max);
        self.announced
            .borrow_mut()
            .insert(key.to_string(), (last, total));
        Ok(())
    }

    /// Runs one selfplay job of `games` games for `key` and emits its events.
    pub(crate) async fn run(&self, key: &str, games: u64, salt: u64) -> SelfplayRun {
        self.run_item(key, games, salt, None).await
    }

    /// As [`Announcer::run`], for the shared work queue's item `item` (its claim lives as long
    /// as the job).
    pub(crate) async fn run_item(
        &self,
        key: &str,
        games: u64,
        salt: u64,
        item: Option<i64>,
    ) -> SelfplayRun {
        let started = Instant::now();
        let result = match self
            .pipeline
            .run_job_for(
                self.ctx,
                "selfplay",
                key,
                &[
                    ("games", games.to_string()),
                    ("seed", seed(salt).to_string()),
                ],
                item,
            )
            .await
        {
            Err(e) => Err(SelfplayFailure::NotStarted(format!("{e:#}"))),
            Ok(outcome) if outcome.success => Ok(outcome),
            Ok(outcome) if outcome.timed_out => Err(SelfplayFailure::TimedOut {
                job_id: outcome.job_id,
                secs: outcome.runtime_secs,
                exit: outcome.exit,
            }),
            Ok(outcome) => Err(SelfplayFailure::Failed {
                last_line: last_error_line(&self.pipeline.root, &outcome.job_id)
                    .map(|line| format!(": {line}"))
                    .unwrap_or_default(),
                job_id: outcome.job_id,
                exit: outcome.exit,
            }),
        };
        if let Ok(outcome) = &result {
            self.ctx.emit(
                "SELFPLAY_COMPLETE",
                payload([
                    ("config_key", key.into()),
                    ("games", games.into()),
                    ("job_id", outcome.job_id.clone().into()),
                    (
                        "duration_secs",
                        round3(started.elapsed().as_secs_f64()).into(),
                    ),
                ]),
            );
        }
        // A job that failed may have met a damaged DB: move it aside, so the next job starts a
        // fresh one instead of failing for ever.
        let guarded = result.is_err() && self.guard(key, Depth::Full);
        // A failed job may still have committed whole batches: those games are real and announced.
        let db = self.pipeline.games_db(key);
        let last =
            |a: &RefCell<BTreeMap<String, (i64, u64)>>| a.borrow().get(key).map_or(0, |v| v.0);
        let mut counted = count_since(&db, key, last(&self.announced));
        if counted.is_err() && !guarded && self.guard(key, Depth::Full) {
            counted = count_since(&db, key, last(&self.announced));
        }
        let (new_games, count_error) = match counted {
            Ok(counted) => {
                let (new, max) = counted.unwrap_or((0, 0));
                let total = {
                    let mut announced = self.announced.borrow_mut();
                    let entry = announced.entry(key.to_string()).or_insert((0, 0));
                    // No DB (yet): ids start at 1 when it comes. A replaced one is counted from
                    // its start by count_since, whose highest id is then below the last one.
                    entry.0 = if counted.is_none() { 0 } else { max };
                    entry.1 += new;
                    entry.1
                };
                if new > 0 {
                    self.ctx.emit(
                        "NEW_GAMES_AVAILABLE",
                        payload([
                            ("config_key", key.into()),
                            ("new_games", new.into()),
                            ("total_games", total.into()),
                            ("db_path", db.display().to_string().into()),
                        ]),
                    );
                }
                (new, None)
            }
            Err(e) => (0, Some(format!("{e:#}"))),
        };
        match &result {
            Ok(o) => println!(
                "{}: {key}: job {} done in {:.1}s, {new_games} new games",
                self.who, o.job_id, o.runtime_secs
            ),
            Err(e) => eprintln!("{}: {key}: {e}", self.who),
        }
        SelfplayRun {
            key: key.to_string(),
            games,
            result,
            new_games,
            count_error,
        }
    }
}

/// The last line a job wrote to stderr (from logs/jobs/<id>.log, `<time> [err] <text>`), which
/// says why it failed far better than its exit status.
pub(crate) fn last_error_line(root: &std::path::Path, job_id: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    if job_id.is_empty() {
        return None;
    }
    let mut file =
        std::fs::File::open(root.join("logs/jobs").join(format!("{job_id}.log"))).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let full = text
        .lines()
        .rev()
        .find_map(|l| l.split_once(" [err] "))?
        .1
        .trim();
    let mut line: String = full.chars().take(300).collect();
    if full.chars().count() > 300 {
        line.push('…');
    }
    (!line.is_empty()).then_some(line)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Latest quality score per key, from QUALITY_SCORE_UPDATED / LOW_QUALITY_DATA_WARNING.
    quality: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    jobs_started: u64,
    jobs_succeeded: u64,
    jobs_failed: u64,
    games_added: u64,
    priority_updates: u64,
    dbs_quarantined: u64,
}

pub(crate) struct Scheduler {
    /// The first cycle since the start has not run yet (see [`FIRST_ITEMS_WAIT`]).
    first_cycle_done: bool,
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    queue: Option<Queue>,
    worker_id: String,
    slots: usize,
    target_games: f64,
    staleness_hours: f64,
    /// A failed item's first wait before it is claimed again (doubling per failure).
    retry_backoff: std::time::Duration,
    /// How long a cycle's pool goes on claiming at least, before it yields to waiting events
    /// ([`POOL_BUDGET`], or the daemon's `interval` if longer).
    budget: std::time::Duration,
    /// The daemon's `interval`: how often a running pool recomputes priorities and publishes
    /// health.
    interval: std::time::Duration,
    state: State,
    priorities: BTreeMap<String, f64>,
    totals: Totals,
    /// Problems of the last priority computation (unreadable DBs, an unwritable file).
    priority_problems: Vec<String>,
    /// The queue could not be opened or used this cycle.
    queue_problem: Option<String>,
    /// The last job failure, until a later job succeeds: (when, what).
    last_failure: Option<(String, String)>,
    /// What the last cycle did.
    last_cycle: Option<String>,
    pending: u64,
    /// Games DBs moved aside by this process, the latest last (at most [`KEEP_QUARANTINED`]).
    quarantined: Vec<Quarantined>,
    /// Games DB problems of the last round (busy, damaged and immovable).
    db_problems: Vec<String>,
    /// Set while every selfplay job fails: no new jobs before its retry time.
    failing: Option<Failing>,
    /// This node is leaving the cluster: no new items are claimed.
    draining: bool,
    /// Keys with a selfplay job running now (stage `selfplay` of the per-key view).
    playing: Busy,
    /// When each key's canonical model was written (unix seconds), as the priorities saw it:
    /// the per-key view's model age on a node that selfplays but does not promote.
    model_written: BTreeMap<String, f64>,
}

/// Quarantines listed in health.
pub(crate) const KEEP_QUARANTINED: usize = 5;

/// Adds `news` to `kept`, keeping the latest [`KEEP_QUARANTINED`].
pub(crate) fn keep_quarantined(kept: &mut Vec<Quarantined>, news: Vec<Quarantined>) {
    kept.extend(news);
    let excess = kept.len().saturating_sub(KEEP_QUARANTINED);
    kept.drain(..excess);
}

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(Scheduler {
        first_cycle_done: false,
        ctx: None,
        pipeline: None,
        queue: None,
        worker_id: format!("{NAME}:{}", std::process::id()),
        slots: 1,
        target_games: 5000.0,
        staleness_hours: 24.0,
        retry_backoff: std::time::Duration::from_secs(30),
        budget: std::time::Duration::from_secs(60),
        interval: std::time::Duration::from_secs(60),
        state: State::default(),
        priorities: BTreeMap::new(),
        totals: Totals::default(),
        priority_problems: Vec::new(),
        queue_problem: None,
        last_failure: None,
        last_cycle: None,
        pending: 0,
        quarantined: Vec::new(),
        db_problems: Vec::new(),
        failing: None,
        draining: false,
        playing: Busy::default(),
        model_written: BTreeMap::new(),
    })
}

/// What one cycle's pool did.
#[derive(Debug, Default)]
struct Round {
    claimed: usize,
    ok: usize,
    failed: usize,
    games: u64,
    /// It stopped claiming because its jobs failed `slots` times in a row.
    stopped_failing: bool,
}

impl Scheduler {
    fn note_db_news(&mut self, quarantined: Vec<Quarantined>, problems: Vec<String>) {
        self.totals.dbs_quarantined += quarantined.len() as u64;
        keep_quarantined(&mut self.quarantined, quarantined);
        self.db_problems = problems;
    }

    fn pipeline(&self) -> &Pipeline {
        self.pipeline.as_ref().expect("started")
    }

    /// Recomputes every key's priority and writes priorities.json.
    fn update_priorities(&mut self) {
        let pipeline = self.pipeline();
        let mut problems = Vec::new();
        let mut priorities = BTreeMap::new();
        let mut written = BTreeMap::new();
        for key in &pipeline.config_keys {
            let completed = match count_completed(&pipeline.games_db(key), key) {
                Ok(n) => n.unwrap_or(0),
                Err(e) => {
                    problems.push(format!("{key}: {e:#}"));
                    0
                }
            };
            let modified = std::fs::metadata(pipeline.canonical(key))
                .and_then(|m| m.modified())
                .ok();
            let model_age_hours =
                modified.map(|t| t.elapsed().map(|d| d.as_secs_f64() / 3600.0).unwrap_or(0.0));
            if let Some(at) = modified
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
            {
                written.insert(key.clone(), at);
            }
            let facts = KeyFacts {
                completed,
                model_age_hours,
                quality: self.state.quality.get(key).copied(),
            };
            priorities.insert(
                key.clone(),
                priority(&facts, self.target_games, self.staleness_hours),
            );
        }
        if let Err(e) = save_state(&priorities_path(pipeline), &priorities) {
            problems.push(format!("cannot write priorities.json: {e:#}"));
        }
        if priorities != self.priorities {
            println!("{NAME}: priorities {}", fmt_map(&priorities));
        }
        self.totals.priority_updates += 1;
        self.priorities = priorities;
        self.priority_problems = problems;
        self.model_written = written;
    }

    fn open_queue(&mut self) -> Option<&Queue> {
        if self.queue.is_none() {
            let opened = Queue::open(self.pipeline(), self.ctx.as_ref().expect("attached"));
            match opened {
                Ok(q) => self.queue = Some(q),
                Err(e) => {
                    self.queue_problem = Some(format!("{e:#}"));
                    return None;
                }
            }
        }
        self.queue.as_ref()
    }

    /// Keeps `slots` jobs running: an item is claimed the moment a slot frees (not when the
    /// slowest job of a batch ends), until none is ready, the node may no longer claim, every job
    /// since the pool began failed, the daemon is stopping or paused, or events wait for the
    /// cycle to end (after [`POOL_BUDGET`]:
    /// only then do the slots idle while the last jobs finish); then the jobs still running are
    /// waited for. Every `interval` meanwhile the priorities are recomputed and health is
    /// published. Returns what the pool ran.
    async fn pool(&mut self) -> Result<Round> {
        let queue = self.queue.take().expect("opened");
        let result = self.pool_on(&queue).await;
        self.queue = Some(queue);
        result
    }

    async fn pool_on(&mut self, queue: &Queue) -> Result<Round> {
        let pipeline = self.pipeline().clone();
        let ctx = self.ctx.clone().expect("attached");
        let announcer = Announcer::new(NAME, &pipeline, &ctx);
        let backoff = self.retry_backoff.as_secs_f64();
        let until = Instant::now() + self.budget;
        let mut refresh = Instant::now() + self.interval;
        let started = ringrift::timefmt::now_rfc3339();
        let slots = self.slots.max(1);
        let mut running: FuturesUnordered<JobFuture<'_>> = FuturesUnordered::new();
        let mut round = Round::default();
        let mut claiming = true;
        let mut failure: Option<anyhow::Error> = None;
        let mut ended: Vec<(i64, SelfplayRun)> = Vec::new();
        // Jobs that failed since the last success (settled or not yet).
        let mut failures_in_a_row = 0;
        loop {
            while claiming && running.len() < slots {
                // Items this node cannot run at all are handed back; many in a row, with nothing
                // run, and it stops claiming until the next cycle.
                let stop = ctx.winding_down()
                    || (Instant::now() >= until && ctx.events_waiting())
                    || (round.ok == 0 && round.failed >= 4 * slots)
                    || (queue.is_shared()
                        && super::work::may_claim(&pipeline.root, SELFPLAY).is_err());
                if stop {
                    claiming = false;
                    break;
                }
                // A slot of the node's (idle_resource's extra jobs hold some too) per job.
                let mut held: Vec<super::slots::Slot> = std::iter::from_fn(|| {
                    super::slots::try_take(&pipeline.root, SELFPLAY_SLOTS, slots)
                })
                .take(slots - running.len())
                .collect();
                if held.is_empty() {
                    // All held by idle_resource: looked for again when a job ends.
                    break;
                }
                let now = now_secs();
                let items = match queue.claim(&self.worker_id, held.len(), now).await {
                    Ok(items) => items,
                    Err(e) => {
                        failure = Some(e);
                        claiming = false;
                        break;
                    }
                };
                if items.is_empty() {
                    // None ready now: looked for again when a job ends.
                    break;
                }
                for item in items {
                    round.claimed += 1;
                    let Some((key, games)) =
                        runnable(NAME, queue, &ctx, &pipeline, &item, now).await
                    else {
                        round.failed += 1;
                        continue;
                    };
                    if let Err(e) = queue.mark_running(item.id, &self.worker_id) {
                        failure = Some(e);
                        claiming = false;
                        break;
                    }
                    if let Err(e) = announcer.baseline(&key) {
                        eprintln!("{NAME}: {key}: cannot count games before the job: {e:#}");
                    }
                    self.totals.jobs_started += 1;
                    if self.playing.start(&key) {
                        ctx.publish(self.report());
                    }
                    let (announcer, id) = (&announcer, item.id);
                    let shared = queue.is_shared().then_some(id);
                    let slot = held.pop();
                    running.push(Box::pin(async move {
                        let run = announcer.run_item(&key, games, id as u64, shared).await;
                        drop(slot);
                        (id, run)
                    }));
                }
            }
            // The jobs that ended are settled once their slots are running again: the next
            // job does not wait for the queue's round trips.
            for (id, run) in ended.drain(..) {
                let attempt = settle(NAME, queue, id, &run, backoff).await;
                self.record_run(id, run, attempt, &mut round);
            }
            // Events are taken in between jobs (and acknowledged), once the free slots run
            // again, so that the slots never idle for them; a WORK_QUEUED needs nothing, as the
            // pool is claiming already.
            while let Some(event) = ctx.take_event() {
                if self.apply_event(&event) {
                    let _ = queue.reprioritize(&self.priorities);
                }
                ctx.ack(event.seq);
            }
            if running.is_empty() {
                break;
            }
            // A job's end, or the time to publish health (a job may run for hours).
            let next = tokio::select! {
                next = running.next() => next,
                () = tokio::time::sleep_until(refresh.into()) => None,
            };
            if let Some((id, run)) = next {
                if self.playing.end(&run.key) {
                    ctx.publish(self.report());
                }
                // Jobs that keep failing wait for the retry schedule instead of spinning
                // through the queue: `slots` failures in a row stop the claims.
                if run.result.is_ok() {
                    failures_in_a_row = 0;
                } else {
                    failures_in_a_row += 1;
                    if failures_in_a_row >= slots {
                        claiming = false;
                        round.stopped_failing = true;
                    }
                }
                ended.push((id, run));
            }
            if Instant::now() >= refresh {
                refresh = Instant::now() + self.interval;
                let (quarantined, db_problems) = announcer.take_db_news();
                self.note_db_news(quarantined, db_problems);
                self.update_priorities();
                if let Err(e) = queue.reprioritize(&self.priorities) {
                    eprintln!("{NAME}: cannot reprioritize pending items: {e:#}");
                }
                self.last_cycle = Some(format!(
                    "running since {}: {} item(s), up to {slots} at a time: {} ok, {} failed, {} new games so far",
                    started, round.claimed, round.ok, round.failed, round.games
                ));
                ctx.publish(self.report());
            }
        }
        let (quarantined, db_problems) = announcer.take_db_news();
        self.note_db_news(quarantined, db_problems);
        match failure {
            Some(e) => Err(e),
            None => Ok(round),
        }
    }

    /// Takes in an event that changes the priorities (a quality score, a promotion: its key is no
    /// longer stale) and recomputes them; false when it changed nothing. Synchronous, so that the
    /// pool handles events between jobs without letting its slots idle.
    fn apply_event(&mut self, event: &Event) -> bool {
        match event.event_type.as_str() {
            "QUALITY_SCORE_UPDATED" | "LOW_QUALITY_DATA_WARNING" => {
                let p = &event.payload;
                let (Some(key), Some(claimed)) = (
                    p.get("config_key").and_then(Value::as_str),
                    p.get("score").and_then(Value::as_f64),
                ) else {
                    return false;
                };
                // The quality monitor's own state decides the score, not the event.
                let score = match super::quality_monitor::vouch(
                    self.pipeline(),
                    key,
                    &event.event_type,
                    claimed,
                ) {
                    Ok(Some(v)) => v.score,
                    Ok(None) => claimed,
                    Err(why) => {
                        eprintln!("{NAME}: {key}: refused {}: {why}", event.event_type);
                        return false;
                    }
                };
                if self.state.quality.get(key) == Some(&score) {
                    return false;
                }
                println!("{NAME}: {key}: data quality {score} ({})", event.event_type);
                self.state.quality.insert(key.to_string(), score);
                let path = self.pipeline().state_path(NAME);
                if let Err(e) = save_state(&path, &self.state) {
                    eprintln!("{NAME}: cannot save state to {}: {e:#}", path.display());
                }
            }
            "MODEL_PROMOTED" => {}
            _ => return false,
        }
        self.update_priorities();
        true
    }

    /// Counts and reports the end of selfplay item `id`'s job.
    fn record_run(
        &mut self,
        id: i64,
        run: SelfplayRun,
        attempt: Option<Attempt>,
        round: &mut Round,
    ) {
        let when = ringrift::timefmt::now_rfc3339();
        {
            match (&attempt, &run.result) {
                (Some(Attempt::Dead { attempts }), Err(e)) => {
                    let attempts = *attempts;
                    eprintln!(
                        "{NAME}: work item {id} ({}) failed its last attempt ({attempts}): set aside: {e}",
                        run.key
                    );
                    work_failed(
                        self.ctx.as_ref().expect("attached"),
                        self.pipeline(),
                        SELFPLAY,
                        id,
                        &run.key,
                        &e.to_string(),
                        attempts,
                    );
                }
                (Some(Attempt::Retry { attempts, at }), Err(_)) => eprintln!(
                    "{NAME}: work item {id} ({}) failed (attempt {attempts}): claimable again in {:.0}s",
                    run.key,
                    (at - now_secs()).max(0.0)
                ),
                _ => {}
            }
            round.games += run.new_games;
            self.totals.games_added += run.new_games;
            if let Some(e) = &run.count_error {
                let problem = format!("{}: {e}", run.key);
                if !self.priority_problems.contains(&problem) {
                    self.priority_problems.push(problem);
                }
            }
            match &run.result {
                Ok(_) => {
                    round.ok += 1;
                    self.totals.jobs_succeeded += 1;
                    self.last_failure = None;
                }
                Err(e) => {
                    round.failed += 1;
                    self.totals.jobs_failed += 1;
                    self.last_failure = Some((
                        when.clone(),
                        format!("work item {id} ({} x{}): {e}", run.key, run.games),
                    ));
                }
            }
        }
    }

    async fn run_cycle(&mut self) {
        self.update_priorities();
        if self.open_queue().is_none() {
            return;
        }
        let queue = self.queue.as_ref().expect("opened");
        if let Err(e) = queue.reprioritize(&self.priorities) {
            eprintln!("{NAME}: cannot reprioritize pending items: {e:#}");
        }
        // A node about to leave the cluster (its unified_idle_shutdown published the intent)
        // drains: it claims nothing more from the shared queue, so nothing is cut short.
        self.draining = queue.is_shared() && {
            let root = &self.pipeline().root;
            super::transfer::cluster_view(root).is_some_and(|v| {
                v.nodes
                    .iter()
                    .any(|n| n.record.node_id == v.node_id && n.record.leaving)
            })
        };
        if self.draining {
            self.last_cycle = Some(format!(
                "last cycle {}: draining: this node is leaving the cluster, no new items",
                ringrift::timefmt::now_rfc3339()
            ));
            return;
        }
        // Only a node with the selfplay role claims the cluster's selfplay items.
        if queue.is_shared()
            && let Err(why) = super::work::may_claim(&self.pipeline().root, SELFPLAY)
        {
            self.last_cycle = Some(format!(
                "last cycle {}: no items claimed: {why}",
                ringrift::timefmt::now_rfc3339()
            ));
            return;
        }
        // Jobs that keep failing are not rerun every cycle: they wait out the retry schedule.
        if let Some(f) = &self.failing
            && f.wait(now_secs()).is_some()
        {
            return;
        }
        if !std::mem::replace(&mut self.first_cycle_done, true) && !queue.is_shared() {
            let ctx = self.ctx.clone().expect("attached");
            let until = tokio::time::Instant::now() + FIRST_ITEMS_WAIT;
            while matches!(queue.pending(), Ok(Some(0)) | Ok(None))
                && tokio::time::Instant::now() < until
                && !ctx.events_waiting()
                && !ctx.winding_down()
            {
                tokio::time::sleep(FIRST_ITEMS_POLL).await;
            }
        }
        let (failed_before, succeeded_before) =
            (self.totals.jobs_failed, self.totals.jobs_succeeded);
        let quarantines_before = self.totals.dbs_quarantined;
        let mut total = Round::default();
        let outcome: Result<()> = async {
            total = self.pool().await?;
            self.pending = self.queue.as_ref().expect("opened").pending()?.unwrap_or(0);
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => self.queue_problem = None,
            Err(e) => {
                eprintln!("{NAME}: work queue: {e:#}");
                self.queue_problem = Some(format!("{e:#}"));
                // Reopen next cycle: the file may have been replaced or repaired.
                self.queue = None;
            }
        }
        let failed = self.totals.jobs_failed > failed_before;
        let succeeded = self.totals.jobs_succeeded > succeeded_before;
        let quarantined = self.totals.dbs_quarantined > quarantines_before;
        // A pool that stopped on failures in a row after successes pauses for the schedule's
        // first step (items of a key that fails may mix with good ones); one with no success at
        // all goes on along the schedule.
        if quarantined || (succeeded && !total.stopped_failing) {
            // A fresh DB deserves a fresh try.
            self.failing = None;
        } else if failed {
            let error = self.last_failure.as_ref().map_or_else(
                || "selfplay jobs failed".to_string(),
                |(_, what)| what.clone(),
            );
            let f = Failing::after(
                if succeeded {
                    None
                } else {
                    self.failing.as_ref()
                },
                error,
                now_secs(),
                ringrift::restart::jitter(),
            );
            eprintln!(
                "{NAME}: {}: {}",
                if succeeded {
                    "selfplay jobs failed in a row"
                } else {
                    "every selfplay job of this cycle failed"
                },
                f.describe(now_secs())
            );
            self.failing = Some(f);
        }
        let when = ringrift::timefmt::now_rfc3339();
        self.last_cycle = Some(if total.claimed == 0 {
            format!("last cycle {when}: no pending work")
        } else {
            format!(
                "last cycle {when}: {} item(s), up to {} at a time: {} ok, {} failed, {} new games",
                total.claimed, self.slots, total.ok, total.failed, total.games
            )
        });
    }

    fn report(&self) -> Report {
        let mut problems: Vec<String> = Vec::new();
        if let Some(q) = &self.queue_problem {
            problems.push(format!("work queue: {q}"));
        }
        match (&self.failing, &self.last_failure) {
            (Some(f), _) => problems.push(format!("selfplay {}", f.describe(now_secs()))),
            (None, Some((when, what))) => problems.push(format!("last job failure {when}: {what}")),
            (None, None) => {}
        }
        for p in self.priority_problems.iter().chain(&self.db_problems) {
            if !problems.contains(p) {
                problems.push(p.clone());
            }
        }
        let healthy = problems.is_empty();
        let mut message = self
            .last_cycle
            .clone()
            .unwrap_or_else(|| "no cycle yet".to_string());
        // The shared queue's pending items are the cluster's: `queue list` counts them.
        let shared = self.pipeline.as_ref().is_some_and(|p| p.shared_queue);
        let pending = if shared {
            "pending: see `queue list` (the cluster's shared queue)".to_string()
        } else {
            format!("{} pending", self.pending)
        };
        message.push_str(&format!(
            "; {pending}; priorities {}",
            fmt_map(&self.priorities)
        ));
        if let Some(q) = self.quarantined.last() {
            message = format!("{}; {message}", q.describe());
        }
        if !healthy {
            message = format!("{}; {message}", problems.join("; "));
        }
        let t = self.totals;
        let mut details = BTreeMap::from([
            (
                "quarantined".to_string(),
                Value::Array(self.quarantined.iter().map(Quarantined::to_json).collect()),
            ),
            (
                "priorities".to_string(),
                serde_json::to_value(&self.priorities).unwrap_or(Value::Null),
            ),
            (
                "quality".to_string(),
                serde_json::to_value(&self.state.quality).unwrap_or(Value::Null),
            ),
            (
                "pending".to_string(),
                if shared {
                    Value::Null
                } else {
                    Value::from(self.pending)
                },
            ),
            ("slots".to_string(), Value::from(self.slots)),
            ("draining".to_string(), Value::from(self.draining)),
        ]);
        // Stage `selfplay` while a key's job runs, and the canonical model's write time (the
        // model this node plays, whoever promoted it).
        let mut view = stage_reports(self.playing.keys().cloned(), Stage::Selfplay);
        for (key, at) in &self.model_written {
            view.entry(key.clone()).or_default().model_written_at = Some(*at);
        }
        view_details(&mut details, view);
        Report::new(
            healthy,
            message,
            details,
            [
                ("jobs_started", t.jobs_started),
                ("jobs_succeeded", t.jobs_succeeded),
                ("jobs_failed", t.jobs_failed),
                ("games_added", t.games_added),
                ("priority_updates", t.priority_updates),
                ("dbs_quarantined", t.dbs_quarantined),
            ],
        )
    }
}

/// `k=v, k=v`, or `(none yet)`: priorities and weights as health shows them.
pub(crate) fn fmt_map(m: &BTreeMap<String, f64>) -> String {
    if m.is_empty() {
        return "(none yet)".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Daemon for Scheduler {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec![
            "QUALITY_SCORE_UPDATED".into(),
            "LOW_QUALITY_DATA_WARNING".into(),
            "MODEL_PROMOTED".into(),
            "WORK_QUEUED".into(),
        ]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, SchedulerSettings::from_map)?;
            // The node's selfplay slots (`pipeline.capacity.selfplay_slots`, which the
            // configuration resolves against the deprecated `slots` of this daemon), shared
            // with idle_resource through [`super::slots`].
            let _ = s.slots;
            self.slots = pipeline.capacity.selfplay_slots.max(1);
            self.target_games = s.target_games;
            self.staleness_hours = s.staleness_hours;
            self.retry_backoff = s.retry_backoff;
            self.budget = settings.interval.max(POOL_BUDGET);
            self.interval = settings.interval;
            self.state = load_state(&pipeline.state_path(NAME));
            println!(
                "{NAME}: {} slot(s), target {} games per key, models stale after {}h, keys {}",
                self.slots,
                self.target_games,
                self.staleness_hours,
                pipeline.config_keys.join(", ")
            );
            self.pipeline = Some(pipeline);
            let worker_id = self.worker_id.clone();
            if self.open_queue().is_some()
                && let Some(Queue::Local(queue)) = self.queue.as_mut()
            {
                match queue.requeue_orphans(&format!("{NAME}:"), &worker_id, now_secs()) {
                    Ok((0, 0)) => {}
                    Ok((requeued, abandoned)) => println!(
                        "{NAME}: requeued {requeued} item(s) a previous process held ({abandoned} out of attempts)"
                    ),
                    Err(e) => eprintln!("{NAME}: {e:#}"),
                }
            }
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.run_cycle().await;
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            // Items arrived in a queue that was empty: run now, not at the next interval.
            if event.event_type == "WORK_QUEUED" {
                self.run_cycle().await;
                return Some(self.report());
            }
            self.apply_event(&event).then(|| self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(completed: u64, age: Option<f64>, quality: Option<f64>) -> KeyFacts {
        KeyFacts {
            completed,
            model_age_hours: age,
            quality,
        }
    }

    #[test]
    fn no_data_and_no_model_is_the_top_priority() {
        assert_eq!(priority(&facts(0, None, None), 5000.0, 24.0), 1.0);
        // Enough data and a fresh model: the floor, never zero.
        assert_eq!(priority(&facts(9000, Some(0.0), None), 5000.0, 24.0), 0.1);
    }

    #[test]
    fn deficit_staleness_and_quality_each_move_the_priority() {
        let base = priority(&facts(2500, Some(12.0), None), 5000.0, 24.0);
        assert!((base - (0.1 + 0.3 + 0.15)).abs() < 1e-9, "{base}");
        assert!(
            priority(&facts(1000, Some(12.0), None), 5000.0, 24.0) > base,
            "more deficit"
        );
        assert!(
            priority(&facts(2500, Some(30.0), None), 5000.0, 24.0) > base,
            "staler"
        );
        assert!(
            priority(&facts(2500, None, None), 5000.0, 24.0) > base,
            "no model = most stale"
        );
        assert_eq!(
            priority(&facts(2500, Some(48.0), None), 5000.0, 24.0),
            priority(&facts(2500, None, None), 5000.0, 24.0),
            "staleness is capped"
        );
        let low = priority(&facts(2500, Some(12.0), Some(0.2)), 5000.0, 24.0);
        assert!(low < base, "low quality lowers the priority");
        let zero = priority(&facts(2500, Some(12.0), Some(0.0)), 5000.0, 24.0);
        assert!(
            zero > 0.0 && (zero - base * 0.25).abs() < 1e-3,
            "but never to zero: {zero}"
        );
        assert_eq!(priority(&facts(0, None, Some(1.0)), 5000.0, 24.0), 1.0);
    }

    #[test]
    fn the_last_stderr_line_of_a_job_explains_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs/jobs")).unwrap();
        std::fs::write(
            dir.path().join("logs/jobs/j-1.log"),
            "2026-01-01T00:00:00.000Z [out] starting\n\
             2026-01-01T00:00:00.100Z [err] ringrift-worker job selfplay: disk full\n\
             2026-01-01T00:00:00.200Z [out] bye\n",
        )
        .unwrap();
        assert_eq!(
            last_error_line(dir.path(), "j-1").as_deref(),
            Some("ringrift-worker job selfplay: disk full")
        );
        assert_eq!(last_error_line(dir.path(), "j-2"), None);
        assert_eq!(last_error_line(dir.path(), ""), None);
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(seed(1), seed(2));
    }
}
