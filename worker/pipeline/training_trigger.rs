//! TRAINING_TRIGGER: decides when an export is worth training on, runs the train job, and hands a
//! verified candidate model to evaluation.
//!
//! Why it is shaped this way:
//! - The export file on disk is the truth. NPZ_EXPORT_COMPLETE only makes the check happen sooner;
//!   every cycle compares data/training/<key>.npz (mtime + size) with the one last trained on, so a
//!   lost event, or a worker killed mid-training, delays training but never skips it.
//! - The gates are one pure function ([`gates`]): enough samples, the per-key cooldown, not already
//!   training, data quality not flagged low, and an exponential backoff after failed runs so a
//!   broken trainer is not restarted every cycle.
//! - Quality is an event-fed flag kept in the state file: a LOW_QUALITY_DATA_WARNING blocks the key
//!   until a QUALITY_SCORE_UPDATED at or above the warning's threshold clears it. Each quality event
//!   is checked against the quality monitor's own state file ([`super::quality_monitor::vouch`]) and the
//!   flag follows that file: an event it contradicts neither pauses nor resumes training.
//! - NPZ_EXPORT_COMPLETE only says "look now": training reads data/training/<key>.npz, and an event
//!   naming an export anywhere else is refused with TRAINING_FAILED.
//! - A candidate is announced only after it loads with `Model::load`; one that does not is renamed
//!   to `<candidate>.bad` and reported as TRAINING_FAILED. An export that does not decode is
//!   quarantined the same way, and auto_export writes a fresh one.
//! - In a cluster (the node's work queue is the cluster's shared one), a key whose gates pass
//!   gets a training item in the shared queue (one per key at a time), and every training node's
//!   training_trigger claims training items and trains their key on its own export, the job bound
//!   to the item: a training node killed mid-run has the item redelivered (to itself when it is
//!   back, or to another training node) once `cluster.work_ack_wait` has passed.
//! - Keys train in parallel, up to `pipeline.capacity.training_slots` runs at once and never two
//!   of one key ([`TrainingTrigger::pool`]): each run is prepared with the daemon (gates, slot,
//!   candidate name, in-flight state), its job is a future that borrows nothing from it, and it
//!   is settled with the daemon when the job ends. The pool looks at the exports again when a job
//!   ends and while events wait, so one slow key never holds another back. With GPUs, each job
//!   gets its slot's as `CUDA_VISIBLE_DEVICES`.
//! - "Up to date" means it: while auto_export's state file says exporting a key keeps failing,
//!   health says that no new data can come and why (status `waiting_for_data`), not that the key
//!   is up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::jobs::game::GameConfig;
use crate::jobs::game::model::Model;
use anyhow::Context;
use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auto_export::{export_failing, quarantine};
use super::work::refused;
use super::{
    KeyHealth, KeyLog, Pipeline, job_failure, load_state, note_error, now_secs, save_or_note,
    stage_reports, typed, view_details,
};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, JobOutcome, Settings};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use ringrift::pipeline_view::Stage;
use ringrift::protocol::{WorkAnswer, WorkOp};
use ringrift::settings::TrainingSettings;
use ringrift::work_queue::{Attempt, TRAINING};

const NAME: &str = "training_trigger";

/// While a pool runs, how often it takes the events that arrived: an export announced meanwhile
/// starts its key's run within this, not after the slowest job.
const RESCAN_EVERY: Duration = Duration::from_millis(500);

/// The variable that gives a job its GPU.
pub(crate) const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// A train run decided on ([`TrainingTrigger::prepare`]): what its job and its settling need.
#[derive(Debug, Clone)]
struct Prepared {
    key: String,
    /// The export it trains on.
    fp: Fingerprint,
    samples: u64,
    /// Where the candidate goes once verified, and where the job writes it first.
    candidate: PathBuf,
    staging: PathBuf,
    /// The shared queue's training item it runs, if any.
    item: Option<i64>,
    /// Its slot's GPU, if the node has any.
    gpu: Option<u64>,
}

/// A running train job: the run and how its job ended.
type TrainJob = LocalBoxFuture<'static, (Prepared, anyhow::Result<JobOutcome>)>;

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(TrainingTrigger::default())
}

/// Which export file: enough to tell a new export from the one already trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    mtime_secs: u64,
    mtime_nanos: u32,
    size: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> std::io::Result<Fingerprint> {
        let meta = std::fs::metadata(path)?;
        let mtime = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Fingerprint {
            mtime_secs: mtime.as_secs(),
            mtime_nanos: mtime.subsec_nanos(),
            size: meta.len(),
        })
    }
}

/// Per config key, kept across restarts in data/coordination/training_trigger.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct KeyState {
    last_trained: Option<Fingerprint>,
    last_training_at: Option<f64>,
    /// Consecutive failed runs, for the backoff.
    failures: u32,
    last_failure_at: Option<f64>,
    /// Set by LOW_QUALITY_DATA_WARNING (its threshold), cleared by a good QUALITY_SCORE_UPDATED.
    quality_low: Option<f64>,
    /// The candidate being written; set if the worker died mid-training.
    in_flight: Option<String>,
    trainings: u64,
    /// The fingerprint of the train job template whose runs failed ([`Pipeline::job_fingerprint`]):
    /// failures of another command are forgotten when the worker starts.
    #[serde(default)]
    failed_job: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    keys: BTreeMap<String, KeyState>,
}

/// Everything the gates look at.
#[derive(Debug, Clone, PartialEq)]
struct GateInput {
    samples: u64,
    min_samples: u64,
    now: f64,
    last_training_at: Option<f64>,
    cooldown: f64,
    training: bool,
    /// A training slot of this node is free.
    slot_free: bool,
    /// The node's training slots (for the message).
    slots: usize,
    quality_low: Option<f64>,
    failures: u32,
    last_failure_at: Option<f64>,
    failure_backoff: f64,
}

/// Why training is held back: the gate's name and the detail for health.
#[derive(Debug, Clone, PartialEq)]
struct Blocked {
    gate: &'static str,
    detail: String,
}

/// Seconds to wait after `failures` consecutive failed runs: `base`, doubling per failure, at
/// most an hour (or `base`, if longer; see [`ringrift::backoff::capped_doubling`]).
fn backoff_secs(failures: u32, base: f64) -> f64 {
    ringrift::backoff::capped_doubling(failures, base, ringrift::backoff::TRAINING_BACKOFF_CAP_SECS)
}

/// The training gates, first failing one wins.
fn gates(g: &GateInput) -> Result<(), Blocked> {
    if g.training {
        return Err(Blocked {
            gate: "already_training",
            detail: "a training run of this key is in progress".into(),
        });
    }
    if let Some(threshold) = g.quality_low {
        return Err(Blocked {
            gate: "quality",
            detail: format!(
                "data quality flagged low (threshold {threshold}); waiting for a QUALITY_SCORE_UPDATED at or above it"
            ),
        });
    }
    if g.samples < g.min_samples {
        return Err(Blocked {
            gate: "min_samples",
            detail: format!("{} samples < min_samples {}", g.samples, g.min_samples),
        });
    }
    if let Some(last) = g.last_training_at {
        let since = g.now - last;
        if since < g.cooldown {
            return Err(Blocked {
                gate: "cooldown",
                detail: format!(
                    "cooldown: last training {since:.0}s ago, {:.0}s to go",
                    g.cooldown - since
                ),
            });
        }
    }
    if let Some(failed_at) = g.last_failure_at {
        let wait = backoff_secs(g.failures, g.failure_backoff);
        let since = g.now - failed_at;
        if since < wait {
            return Err(Blocked {
                gate: "failure_backoff",
                detail: format!(
                    "backing off after {} failed run(s): retry in {:.0}s",
                    g.failures,
                    wait - since
                ),
            });
        }
    }
    if !g.slot_free {
        return Err(Blocked {
            gate: "slots",
            detail: format!(
                "waiting for a training slot: all {} are busy with other keys",
                g.slots
            ),
        });
    }
    Ok(())
}

/// The quality flag after a quality event: a warning sets it to its threshold; an update at or
/// above the flagged threshold clears it; anything else leaves it.
fn apply_quality(
    flag: Option<f64>,
    event_type: &str,
    score: f64,
    threshold: Option<f64>,
) -> Option<f64> {
    match event_type {
        "LOW_QUALITY_DATA_WARNING" => Some(threshold.unwrap_or(score)),
        "QUALITY_SCORE_UPDATED" => match flag {
            Some(t) if score >= t => None,
            other => other,
        },
        _ => flag,
    }
}

/// Checks that a model file is usable for `key`: `Model::load` for the keys the built-in game
/// plays; for other keys (a user's own trainer) only that the file exists and is not empty.
pub(crate) fn check_model(path: &Path, key: &str) -> anyhow::Result<()> {
    match GameConfig::parse(key) {
        Ok(config) => {
            Model::load(path, &config)
                .with_context(|| format!("{} does not load", path.display()))?;
        }
        Err(_) => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len();
            anyhow::ensure!(len > 0, "{} is empty", path.display());
        }
    }
    Ok(())
}

/// The number of samples of an export, or why it is unusable.
fn count_samples(path: &Path, key: &str) -> anyhow::Result<u64> {
    Ok(super::auto_export::read_export(path, key)?.len() as u64)
}

#[derive(Default)]
struct TrainingTrigger {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    /// In a cluster: why this node claims no training items, while it does not (logged once).
    not_claiming: Option<String>,
    min_samples: u64,
    cooldown: f64,
    epochs: u64,
    learning_rate: f64,
    failure_backoff: f64,
    /// `pipeline.capacity.training_slots`.
    slots: usize,
    /// `pipeline.capacity.gpus` (detected when not configured).
    gpus: u64,
    /// The daemon's `interval`: how often a running pool publishes health and rescans.
    interval: Duration,
    state: State,
    /// Keys training now → the slot each holds.
    training: BTreeMap<String, usize>,
    /// Sample counts of exports already decoded, so an unchanged file is not decoded every cycle.
    samples_cache: BTreeMap<String, (Fingerprint, u64)>,
    health: KeyHealth,
    checks: u64,
    started: u64,
    completed: u64,
    failed: u64,
    bad_exports: u64,
    /// Keys whose export keeps failing (auto_export's state says so): no new data can come.
    starved: BTreeSet<String>,
}

impl TrainingTrigger {
    fn report(&self) -> Report {
        let healthy = self.health.healthy();
        let message = self.health.message("no check yet");
        let keys: serde_json::Map<String, Value> = self
            .state
            .keys
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    json!({"last_training_at": s.last_training_at, "failures": s.failures,
                           "quality_low": s.quality_low, "trainings": s.trainings}),
                )
            })
            .collect();
        let status = if !healthy {
            "degraded"
        } else if !self.starved.is_empty() {
            "waiting_for_data"
        } else {
            "ok"
        };
        let mut details = BTreeMap::from([
            ("keys".to_string(), Value::Object(keys)),
            (
                "export_failing".to_string(),
                Value::from(self.starved.iter().cloned().collect::<Vec<_>>()),
            ),
            ("min_samples".to_string(), Value::from(self.min_samples)),
            ("training_slots".to_string(), Value::from(self.slots)),
            ("gpus".to_string(), Value::from(self.gpus)),
            (
                "running".to_string(),
                serde_json::to_value(&self.training).unwrap_or(Value::Null),
            ),
            ("cooldown".to_string(), Value::from(self.cooldown)),
            ("last_error".to_string(), json!(self.health.last_error)),
        ]);
        // Stage `training` of the per-key view while a key's train job runs.
        view_details(
            &mut details,
            stage_reports(self.training.keys().cloned(), Stage::Training),
        );
        Report::with_status(
            healthy,
            status,
            message,
            details,
            [
                ("checks", self.checks),
                ("trainings_started", self.started),
                ("trainings_completed", self.completed),
                ("training_failures", self.failed),
                ("bad_exports", self.bad_exports),
            ],
        )
    }

    fn set(&mut self, key: &str, ok: bool, message: String) {
        self.health.set(NAME, key, ok, message, KeyLog::Changes);
    }

    fn save(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        save_or_note(pipeline, NAME, &self.state, &mut self.health.last_error);
    }

    fn key_state(&mut self, key: &str) -> &mut KeyState {
        self.state.keys.entry(key.to_string()).or_default()
    }

    /// Forgets `key`'s failed runs when the operator reset its backoff after them
    /// (`pipeline reset-backoff KEY`, [`ringrift::backoff`]).
    fn apply_reset(&mut self, key: &str) {
        let root = self.pipeline.as_ref().expect("started").root.clone();
        let Some(at) = ringrift::backoff::reset_at(&root, key) else {
            return;
        };
        let ks = self.key_state(key);
        if ks.failures == 0 || ks.last_failure_at.is_some_and(|f| f > at) {
            return;
        }
        let failures = ks.failures;
        ks.failures = 0;
        ks.last_failure_at = None;
        ks.failed_job = None;
        self.save();
        println!(
            "{NAME}: {key}: failure backoff reset by the operator ({failures} failed run(s) forgotten)"
        );
    }

    /// Forgets failed runs of a train job template other than the current one (the command or
    /// max_runtime changed since): a new command starts without the old one's backoff.
    fn forget_other_jobs(&mut self) {
        let current = self
            .pipeline
            .as_ref()
            .expect("started")
            .job_fingerprint("train");
        let mut forgot = Vec::new();
        for (key, ks) in self.state.keys.iter_mut() {
            if ks.failures > 0 && ks.failed_job.as_deref() != Some(current.as_str()) {
                forgot.push(format!("{key} ({} failed run(s))", ks.failures));
                ks.failures = 0;
                ks.last_failure_at = None;
                ks.failed_job = None;
            }
        }
        if !forgot.is_empty() {
            println!(
                "{NAME}: the train job changed since its last failures: no backoff carried over for {}",
                forgot.join(", ")
            );
            self.save();
        }
    }

    /// Whether `key` should train now: its prepared run ([`TrainingTrigger::prepare`]) if its
    /// export is new and every gate passes (in a cluster: a training item is queued instead, and
    /// None returned). Health says why not, otherwise.
    async fn check_key(&mut self, key: &str) -> Option<Prepared> {
        self.checks += 1;
        self.apply_reset(key);
        let pipeline = self.pipeline.clone().expect("started");
        let npz = pipeline.npz(key);
        // Whether new data can come at all: while auto_export keeps failing, "up to date" would
        // be a lie.
        let export_failing = export_failing(&pipeline, key);
        if export_failing.is_some() {
            self.starved.insert(key.to_string());
        } else {
            self.starved.remove(key);
        }
        let starved = |what: String| match &export_failing {
            Some(f) => format!(
                "{what}; no new data: auto_export is failing, {}",
                f.describe(now_secs())
            ),
            None => what,
        };
        let fp = match Fingerprint::of(&npz) {
            Ok(fp) => fp,
            Err(_) => {
                let message = starved(format!("no export yet ({} does not exist)", npz.display()));
                self.set(key, true, message);
                return None;
            }
        };
        let ks = self.key_state(key).clone();
        if ks.last_trained == Some(fp) {
            let message = match &export_failing {
                None => format!(
                    "up to date: {} run(s); the current export is trained on",
                    ks.trainings
                ),
                Some(_) => starved(format!(
                    "the current export is trained on ({} run(s))",
                    ks.trainings
                )),
            };
            self.set(key, true, message);
            return None;
        }
        let samples = match self.samples_cache.get(key) {
            Some((cached, n)) if *cached == fp => *n,
            _ => match count_samples(&npz, key) {
                Ok(n) => {
                    self.samples_cache.insert(key.to_string(), (fp, n));
                    n
                }
                Err(e) => {
                    self.bad_exports += 1;
                    let moved = quarantine(&npz)
                        .map(|p| format!("; moved to {}", p.display()))
                        .unwrap_or_default();
                    let error = format!("unusable export: {e:#}{moved}");
                    self.set(key, false, error.clone());
                    self.ctx.as_ref().expect("attached").emit(
                        "TRAINING_FAILED",
                        payload([("config_key", key.into()), ("error", error.into())]),
                    );
                    return None;
                }
            },
        };
        let input = self.gate_input(key, &ks, samples);
        match gates(&input) {
            Err(blocked) => {
                // A failed run keeps the key unhealthy while it backs off.
                let ok = blocked.gate != "failure_backoff";
                self.set(
                    key,
                    ok,
                    format!(
                        "new export of {samples} samples held back: {}",
                        blocked.detail
                    ),
                );
                None
            }
            // In a cluster: a training item any training node may take (this one too, below).
            Ok(()) if pipeline.shared_queue => {
                self.enqueue(key, samples).await;
                None
            }
            Ok(()) => self.prepare(&pipeline, key, fp, samples, None).ok(),
        }
    }

    /// In a cluster: asks for a training item of `key` (the shared queue keeps one per key at a
    /// time), which a training node's [`TrainingTrigger::claim_training`] runs.
    async fn enqueue(&mut self, key: &str, samples: u64) {
        let ctx = self.ctx.clone().expect("attached");
        let answer = ctx
            .work(WorkOp::Enqueue {
                item_type: TRAINING.into(),
                config_key: key.into(),
                config: None,
                unique: None,
            })
            .await;
        let (ok, message) = match answer {
            WorkAnswer::Enqueued {
                item_id: Some(id), ..
            } => {
                println!(
                    "{NAME}: {key}: new export of {samples} samples: training item {id} queued"
                );
                (
                    true,
                    format!("new export of {samples} samples: training item {id} queued"),
                )
            }
            WorkAnswer::Enqueued { item_id: None, .. } => (
                true,
                format!(
                    "new export of {samples} samples: a training item of {key} is queued or running"
                ),
            ),
            other => (
                false,
                format!("cannot queue a training item: {:#}", refused(other)),
            ),
        };
        self.set(key, ok, message);
    }

    /// In a cluster: claims up to as many training items as this node has free training slots
    /// from the shared queue, and starts training each one's key on this node's export, bound to
    /// the item (its claim lives as long as the job); the item is done when the candidate is
    /// announced, handed back (after `failure_backoff`, doubling) when the run fails, and set
    /// aside after its third failure (WORK_FAILED) ([`TrainingTrigger::settle_work`]). An item
    /// whose key this node's current export is trained on already is done at once.
    async fn claim_training(&mut self, running: &mut FuturesUnordered<TrainJob>) {
        let ctx = self.ctx.clone().expect("attached");
        let pipeline = self.pipeline.clone().expect("started");
        // Only a node with the training role trains the cluster's items.
        if let Err(why) = super::work::may_claim(&pipeline.root, TRAINING) {
            if self.not_claiming.as_deref() != Some(why.as_str()) {
                println!("{NAME}: not claiming training items: {why}");
            }
            self.not_claiming = Some(why);
            return;
        }
        self.not_claiming = None;
        let free = self.slots.saturating_sub(self.training.len());
        if free == 0 {
            return;
        }
        let items = match ctx
            .work(WorkOp::Claim {
                item_type: TRAINING.into(),
                max: free as u32,
            })
            .await
        {
            WorkAnswer::Claimed { items } => items,
            other => {
                eprintln!("{NAME}: cannot claim training work: {:#}", refused(other));
                return;
            }
        };
        for item in items {
            let key = serde_json::from_str::<Value>(&item.config)
                .ok()
                .and_then(|c| c.get("config_key")?.as_str().map(str::to_string));
            // What this node cannot train at all (or not now) goes back for another training
            // node, without counting as a failed run.
            let cannot = match &key {
                None => Some(format!("no config key in {:?}", item.config)),
                Some(k) if !pipeline.config_keys.contains(k) => {
                    Some(format!("config key {k} is not in pipeline.config_keys"))
                }
                Some(k) if !pipeline.npz(k).exists() => Some(format!(
                    "no export of {k} on this node ({} does not exist)",
                    pipeline.npz(k).display()
                )),
                Some(k) if self.training.contains_key(k) => {
                    Some(format!("{k} is training on this node already"))
                }
                Some(_) if self.training.len() >= self.slots => {
                    Some("every training slot of this node is busy".to_string())
                }
                Some(k) => self.held_back(&pipeline, k),
            };
            match (key, cannot) {
                (Some(k), None) => match self.prepare_item(&pipeline, &k, item.id) {
                    Ok(Some(p)) => running.push(self.launch(p)),
                    Ok(None) => {
                        self.settle_work(Some(&k), WorkOp::Complete { item_id: item.id }, None)
                            .await;
                    }
                    Err(e) => {
                        let op = WorkOp::Fail {
                            item_id: item.id,
                            error: e.clone(),
                            backoff_secs: self.failure_backoff,
                        };
                        self.settle_work(Some(&k), op, Some(e)).await;
                    }
                },
                (key, reason) => {
                    let reason = reason.unwrap_or_else(|| "no config key".into());
                    println!("{NAME}: training item {}: handed back: {reason}", item.id);
                    let op = WorkOp::Release {
                        item_id: item.id,
                        reason,
                    };
                    self.settle_work(key.as_deref(), op, None).await;
                }
            }
        }
    }

    /// Tells the shared queue how a training item ended (`op`); `error`: why it failed, for
    /// WORK_FAILED when that was its last attempt.
    async fn settle_work(&self, key: Option<&str>, op: WorkOp, error: Option<String>) {
        let ctx = self.ctx.clone().expect("attached");
        let pipeline = self.pipeline.as_ref().expect("started");
        let item_id = match &op {
            WorkOp::Complete { item_id }
            | WorkOp::Fail { item_id, .. }
            | WorkOp::Release { item_id, .. } => *item_id,
            _ => 0,
        };
        match ctx.work(op).await {
            WorkAnswer::Settled {
                attempt: Some(Attempt::Dead { attempts }),
            } => {
                if let Some(k) = key {
                    super::work::work_failed(
                        &ctx,
                        pipeline,
                        TRAINING,
                        item_id,
                        k,
                        &error.unwrap_or_default(),
                        attempts,
                    );
                }
            }
            WorkAnswer::Settled { .. } => {}
            other => eprintln!("{NAME}: training item {item_id}: {:#}", refused(other)),
        }
    }

    fn gate_input(&self, key: &str, ks: &KeyState, samples: u64) -> GateInput {
        GateInput {
            samples,
            min_samples: self.min_samples,
            now: now_secs(),
            last_training_at: ks.last_training_at,
            cooldown: self.cooldown,
            training: self.training.contains_key(key),
            // In a cluster the queue hands out the work: a training item is queued whatever
            // this node's slots; claims take only as many as slots are free.
            slot_free: self.training.len() < self.slots
                || self.pipeline.as_ref().is_some_and(|p| p.shared_queue),
            slots: self.slots,
            quality_low: ks.quality_low,
            failures: ks.failures,
            last_failure_at: ks.last_failure_at,
            failure_backoff: self.failure_backoff,
        }
    }

    /// Why this node's own gates hold training of `key` back now (low quality, too few samples,
    /// its cooldown, its failure backoff), if they do: a training item of another node is then
    /// handed back rather than trained here. None also when this node's export is trained on
    /// already (the item is done at once).
    fn held_back(&mut self, pipeline: &Pipeline, key: &str) -> Option<String> {
        self.apply_reset(key);
        let npz = pipeline.npz(key);
        let fp = Fingerprint::of(&npz).ok()?;
        let ks = self.key_state(key).clone();
        if ks.last_trained == Some(fp) {
            return None;
        }
        let samples = match self.samples_cache.get(key) {
            Some((cached, n)) if *cached == fp => *n,
            _ => match count_samples(&npz, key) {
                Ok(n) => {
                    self.samples_cache.insert(key.to_string(), (fp, n));
                    n
                }
                Err(e) => return Some(format!("unusable export of {key} here: {e:#}")),
            },
        };
        let input = self.gate_input(key, &ks, samples);
        gates(&input)
            .err()
            .map(|b| format!("held back on this node: {}", b.detail))
    }

    /// Prepares training item `id` of `key` here: its run, None when this node's current export
    /// is trained on already (the item is done), or why it cannot run.
    fn prepare_item(
        &mut self,
        pipeline: &Pipeline,
        key: &str,
        id: i64,
    ) -> Result<Option<Prepared>, String> {
        let npz = pipeline.npz(key);
        let fp = Fingerprint::of(&npz)
            .map_err(|e| format!("no export of {key} on this node ({}: {e})", npz.display()))?;
        if self.key_state(key).last_trained == Some(fp) {
            println!("{NAME}: {key}: training item {id}: this node's export is trained on already");
            return Ok(None);
        }
        let samples = match self.samples_cache.get(key) {
            Some((cached, n)) if *cached == fp => *n,
            _ => count_samples(&npz, key).map_err(|e| format!("unusable export: {e:#}"))?,
        };
        println!("{NAME}: {key}: training item {id}: training on this node's export");
        self.prepare(pipeline, key, fp, samples, Some(id)).map(Some)
    }

    /// The first training slot no running job holds.
    fn free_slot(&self) -> usize {
        (0..self.slots)
            .find(|s| !self.training.values().any(|held| held == s))
            .unwrap_or(0)
    }

    /// The synchronous start of a run of `key` on its export (`fp`, `samples` samples; `item`:
    /// the shared queue's training item it runs, if any): takes a slot, names the candidate,
    /// records it in flight, says TRAINING_STARTED. Err: why it cannot run (said in health and
    /// TRAINING_FAILED already).
    fn prepare(
        &mut self,
        pipeline: &Pipeline,
        key: &str,
        fp: Fingerprint,
        samples: u64,
        item: Option<i64>,
    ) -> Result<Prepared, String> {
        let dir = pipeline.candidates_dir(key);
        let ms = (now_secs() * 1000.0) as u64;
        let candidate = dir.join(format!("{key}-{ms}.bin"));
        // The job writes a staging file; it becomes `<key>-<ms>.bin` (which evaluation looks for)
        // only once verified, just before TRAINING_COMPLETED: evaluation never races ahead of it.
        let staging = staging_path(&candidate);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(self.failure(
                key,
                None,
                format!("cannot create {}: {e}", dir.display()),
                None,
            ));
        }
        let slot = self.free_slot();
        self.training.insert(key.to_string(), slot);
        self.key_state(key).in_flight = Some(staging.display().to_string());
        self.save();
        self.started += 1;
        let gpu = super::gpu_for_slot(0, slot, self.gpus);
        println!(
            "{NAME}: {key}: training on {samples} samples → {} (slot {slot}{})",
            candidate.display(),
            gpu.map_or(String::new(), |g| format!(", GPU {g}"))
        );
        self.set(
            key,
            true,
            format!(
                "training since {} on {samples} samples → {} (slot {slot})",
                ringrift::timefmt::now_rfc3339(),
                candidate.display()
            ),
        );
        self.ctx.as_ref().expect("attached").emit(
            "TRAINING_STARTED",
            payload([
                ("config_key", key.into()),
                ("npz_path", pipeline.npz(key).display().to_string().into()),
            ]),
        );
        Ok(Prepared {
            key: key.to_string(),
            fp,
            samples,
            candidate,
            staging,
            item,
            gpu,
        })
    }

    /// The train job of prepared run `p`: a future that borrows nothing from the daemon.
    fn launch(&self, p: Prepared) -> TrainJob {
        let pipeline = self.pipeline.clone().expect("started");
        let ctx = self.ctx.clone().expect("attached");
        let (epochs, learning_rate) = (self.epochs, self.learning_rate);
        Box::pin(async move {
            let vars = [
                ("candidate_path", p.staging.display().to_string()),
                ("epochs", epochs.to_string()),
                ("learning_rate", learning_rate.to_string()),
            ];
            let env = p
                .gpu
                .map(|g| (CUDA_VISIBLE_DEVICES.to_string(), g.to_string()))
                .into_iter()
                .collect();
            let outcome = pipeline
                .run_job_env(&ctx, "train", &p.key, &vars, p.item, env)
                .await;
            (p, outcome)
        })
    }

    /// The synchronous end of run `p` whose job ended with `outcome`: frees its slot, verifies
    /// and announces the candidate (TRAINING_COMPLETED), or records the failure. Err: why it
    /// failed (said in health and TRAINING_FAILED already).
    fn settle(&mut self, p: Prepared, outcome: anyhow::Result<JobOutcome>) -> Result<(), String> {
        self.training.remove(&p.key);
        let Prepared {
            key,
            fp,
            samples,
            candidate,
            staging,
            ..
        } = p;
        let key = key.as_str();
        let pipeline = self.pipeline.clone().expect("started");
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                return Err(self.failure(
                    key,
                    None,
                    format!("cannot start the train job: {e:#}"),
                    Some(&staging),
                ));
            }
        };
        if !outcome.success {
            let error = job_failure("train", &outcome);
            return Err(self.failure(key, Some(&outcome.job_id), error, Some(&staging)));
        }
        if let Err(e) = pipeline.check_model(&staging, key) {
            let error = format!(
                "train job {} succeeded but the candidate is unusable: {e:#}",
                outcome.job_id
            );
            return Err(self.failure(key, Some(&outcome.job_id), error, Some(&staging)));
        }
        if let Err(e) = std::fs::rename(&staging, &candidate) {
            let error = format!(
                "cannot move {} to {}: {e}",
                staging.display(),
                candidate.display()
            );
            return Err(self.failure(key, Some(&outcome.job_id), error, Some(&staging)));
        }
        let now = now_secs();
        let ks = self.key_state(key);
        ks.last_trained = Some(fp);
        ks.last_training_at = Some(now);
        ks.failures = 0;
        ks.last_failure_at = None;
        ks.failed_job = None;
        ks.in_flight = None;
        ks.trainings += 1;
        self.save();
        self.completed += 1;
        self.set(
            key,
            true,
            format!(
                "trained at {} on {samples} samples → {}",
                ringrift::timefmt::now_rfc3339(),
                candidate.display()
            ),
        );
        self.ctx.as_ref().expect("attached").emit(
            "TRAINING_COMPLETED",
            payload([
                ("config_key", key.into()),
                ("model_path", candidate.display().to_string().into()),
                ("samples", samples.into()),
                ("job_id", outcome.job_id.into()),
            ]),
        );
        Ok(())
    }

    /// The config keys, those trained longest ago first (never trained: first of all), so a
    /// freed slot goes to the key that waited longest.
    fn keys_by_wait(&self) -> Vec<String> {
        let pipeline = self.pipeline.as_ref().expect("started");
        let mut keys: Vec<(f64, String)> = pipeline
            .config_keys
            .iter()
            .map(|k| {
                let at = self
                    .state
                    .keys
                    .get(k)
                    .and_then(|s| s.last_training_at)
                    .unwrap_or(f64::NEG_INFINITY);
                (at, k.clone())
            })
            .collect();
        keys.sort_by(|a, b| a.0.total_cmp(&b.0));
        keys.into_iter().map(|(_, k)| k).collect()
    }

    /// Starts a run of every key that should train, as slots allow (keys already training are
    /// skipped: never two runs of one key), and in a cluster claims training items for the
    /// slots still free.
    async fn fill(&mut self, running: &mut FuturesUnordered<TrainJob>) {
        for key in self.keys_by_wait() {
            if self.training.contains_key(&key) {
                continue;
            }
            if let Some(p) = self.check_key(&key).await {
                running.push(self.launch(p));
            }
        }
        if self.pipeline.as_ref().expect("started").shared_queue {
            self.claim_training(running).await;
        }
    }

    /// Keeps up to `training_slots` train jobs running, across config keys: each key is checked
    /// now, again whenever a job ends, whenever events arrived (taken and applied between jobs
    /// within [`RESCAN_EVERY`], so one slow key never holds another back), and every `interval`;
    /// health is published meanwhile. It stops starting runs when
    /// the daemon stops, pauses or stands by, and returns once no job runs.
    async fn pool(&mut self) {
        let ctx = self.ctx.clone().expect("attached");
        let mut running: FuturesUnordered<TrainJob> = FuturesUnordered::new();
        let mut rescan = true;
        let mut look = Instant::now() + RESCAN_EVERY;
        let mut publish = Instant::now() + self.interval;
        loop {
            // Events that arrived meanwhile are taken between jobs (and acknowledged): a quality
            // warning holds its key back before the next check, an export is looked at now.
            while let Some(event) = ctx.take_event() {
                rescan |= self.apply_event(&event).unwrap_or(false);
                ctx.ack(event.seq);
            }
            if rescan && !ctx.winding_down() {
                rescan = false;
                self.fill(&mut running).await;
            }
            if running.is_empty() {
                break;
            }
            let next = tokio::select! {
                next = running.next() => next,
                () = tokio::time::sleep_until(look.min(publish).into()) => None,
            };
            if let Some((p, outcome)) = next {
                let (key, item) = (p.key.clone(), p.item);
                let result = self.settle(p, outcome);
                if let Some(id) = item {
                    let op = match &result {
                        Ok(()) => WorkOp::Complete { item_id: id },
                        Err(e) => WorkOp::Fail {
                            item_id: id,
                            error: e.clone(),
                            backoff_secs: self.failure_backoff,
                        },
                    };
                    self.settle_work(Some(&key), op, result.err()).await;
                }
                // TRAINING_COMPLETED goes out before anything else.
                tokio::task::yield_now().await;
                rescan = true;
            }
            let now = Instant::now();
            if now >= look {
                look = now + RESCAN_EVERY;
                rescan |= ctx.events_waiting();
            }
            if now >= publish {
                publish = now + self.interval;
                rescan = true;
            }
            // Which keys run shows at the next heartbeat, not only at the cycle's end.
            ctx.publish(self.report());
        }
    }

    /// Applies `event` (a quality flag, a refusal of an export named elsewhere): whether the
    /// keys are to be looked at now; None when the event is not this daemon's to act on. Used
    /// by [`Daemon::on_event`] and, for events that arrive while jobs run, by the pool.
    fn apply_event(&mut self, event: &Event) -> Option<bool> {
        {
            let pipeline = self.pipeline.clone().expect("started");
            let key = pipeline.event_config_key(NAME, event)?;
            match event.event_type.as_str() {
                "QUALITY_SCORE_UPDATED" | "LOW_QUALITY_DATA_WARNING" => {
                    let score = event
                        .payload
                        .get("score")
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0);
                    let threshold = event.payload.get("threshold").and_then(Value::as_f64);
                    let before = self.key_state(&key).quality_low;
                    let after = match super::quality_monitor::vouch(
                        &pipeline,
                        &key,
                        &event.event_type,
                        score,
                    ) {
                        Err(why) => {
                            let error = format!("refused {}: {why}", event.event_type);
                            note_error(
                                &mut self.health.last_error,
                                NAME,
                                &format!("{key}: {error}"),
                            );
                            return Some(false);
                        }
                        // The monitor's state decides, whatever the event claims.
                        Ok(Some(v)) => v.warned.then(|| v.threshold.or(threshold).unwrap_or(score)),
                        Ok(None) => apply_quality(before, &event.event_type, score, threshold),
                    };
                    if after != before {
                        println!(
                            "{NAME}: {key}: {} (score {score}): training {}",
                            event.event_type,
                            if after.is_some() { "paused" } else { "resumed" }
                        );
                        self.key_state(&key).quality_low = after;
                        self.save();
                    }
                    if after.is_some() {
                        let detail =
                            format!("data quality flagged low (score {score}): training paused");
                        self.set(&key, true, detail);
                    }
                    Some(after.is_none())
                }
                _ => {
                    if let Err(why) =
                        Pipeline::check_event_path(event, "npz_path", &pipeline.training_dir())
                    {
                        // Not a failed run: no backoff, no change to the key's health.
                        note_error(&mut self.health.last_error, NAME, &format!("{key}: {why}"));
                        self.ctx.as_ref().expect("attached").emit(
                            "TRAINING_FAILED",
                            payload([
                                ("config_key", key.as_str().into()),
                                ("error", why.to_string().into()),
                            ]),
                        );
                        return Some(false);
                    }
                    Some(true)
                }
            }
        }
    }

    fn failure(
        &mut self,
        key: &str,
        job_id: Option<&str>,
        error: String,
        candidate: Option<&Path>,
    ) -> String {
        let moved = candidate
            .filter(|c| c.exists())
            .and_then(quarantine)
            .map(|p| format!("; candidate moved to {}", p.display()))
            .unwrap_or_default();
        let job = self
            .pipeline
            .as_ref()
            .expect("started")
            .job_fingerprint("train");
        let ks = self.key_state(key);
        ks.failures += 1;
        ks.last_failure_at = Some(now_secs());
        ks.failed_job = Some(job);
        ks.in_flight = None;
        let retry = backoff_secs(ks.failures, self.failure_backoff);
        self.save();
        self.failed += 1;
        self.set(
            key,
            false,
            format!("{error}{moved}; retrying in {retry:.0}s"),
        );
        let mut p = payload([
            ("config_key", key.into()),
            ("error", format!("{error}{moved}").into()),
        ]);
        if let Some(id) = job_id {
            p["job_id"] = id.into();
        }
        self.ctx
            .as_ref()
            .expect("attached")
            .emit("TRAINING_FAILED", p);
        format!("{error}{moved}")
    }

    /// A run the previous worker did not finish: keep its candidate if it is whole (evaluation
    /// finds it on disk), quarantine it otherwise; the export is trained on again either way.
    fn recover_interrupted(&mut self) {
        let keys: Vec<String> = self.state.keys.keys().cloned().collect();
        for key in keys {
            let Some(candidate) = self.key_state(&key).in_flight.take() else {
                continue;
            };
            let path = Path::new(&candidate);
            let what = if !path.exists() {
                "no candidate was written".to_string()
            } else if self
                .pipeline
                .as_ref()
                .expect("started")
                .check_model(path, &key)
                .is_ok()
            {
                // Finished but never announced: announce it now, as the run would have.
                let fin = final_path(path);
                match std::fs::rename(path, &fin) {
                    Ok(()) => {
                        if let Some(ctx) = &self.ctx {
                            ctx.emit(
                                "TRAINING_COMPLETED",
                                payload([
                                    ("config_key", key.as_str().into()),
                                    ("model_path", fin.display().to_string().into()),
                                ]),
                            );
                        }
                        format!(
                            "its candidate is complete: {} goes to evaluation",
                            fin.display()
                        )
                    }
                    Err(e) => {
                        format!("its candidate is complete but cannot be moved into place: {e}")
                    }
                }
            } else {
                let moved = quarantine(path)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                format!("its partial candidate was moved to {moved}")
            };
            println!(
                "{NAME}: {key}: a training run was interrupted by a restart ({candidate}): {what}"
            );
            self.save();
        }
    }
}

/// Where the train job writes a candidate before it is verified.
fn staging_path(candidate: &Path) -> std::path::PathBuf {
    candidate.with_extension("bin.training")
}

/// The candidate a staging file becomes.
fn final_path(staging: &Path) -> std::path::PathBuf {
    let name = staging
        .file_name()
        .map(|n| n.to_string_lossy().replace(".bin.training", ".bin"))
        .unwrap_or_default();
    staging.with_file_name(name)
}

impl Daemon for TrainingTrigger {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec![
            "NPZ_EXPORT_COMPLETE".into(),
            "BACKOFF_RESET".into(),
            "QUALITY_SCORE_UPDATED".into(),
            "LOW_QUALITY_DATA_WARNING".into(),
        ]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, TrainingSettings::from_map)?;
            self.min_samples = s.min_samples;
            self.cooldown = s.cooldown.as_secs_f64();
            self.epochs = s.epochs;
            self.learning_rate = s.learning_rate;
            self.failure_backoff = s.failure_backoff.as_secs_f64();
            self.slots = pipeline.capacity.training_slots.max(1);
            self.gpus = pipeline.capacity.resolve_gpus();
            self.interval = settings.interval;
            anyhow::ensure!(
                self.learning_rate > 0.0,
                "learning_rate must be positive, not {}",
                self.learning_rate
            );
            self.state = load_state(&pipeline.state_path(NAME));
            println!(
                "{NAME}: watching {} ({} training slot(s), {} GPU(s); min_samples {}, cooldown {}s, epochs {}, lr {}, failure backoff {}s)",
                pipeline.config_keys.join(", "),
                self.slots,
                self.gpus,
                self.min_samples,
                self.cooldown,
                self.epochs,
                self.learning_rate,
                self.failure_backoff
            );
            self.pipeline = Some(pipeline);
            self.forget_other_jobs();
            self.recover_interrupted();
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.pool().await;
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            if self.apply_event(&event)? {
                self.pool().await;
            }
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> GateInput {
        GateInput {
            samples: 500,
            min_samples: 100,
            now: 10_000.0,
            last_training_at: None,
            cooldown: 300.0,
            training: false,
            slot_free: true,
            slots: 1,
            quality_low: None,
            failures: 0,
            last_failure_at: None,
            failure_backoff: 60.0,
        }
    }

    fn gate_of(g: &GateInput) -> Option<&'static str> {
        gates(g).err().map(|b| b.gate)
    }

    #[test]
    fn every_gate_blocks_on_its_own() {
        assert_eq!(gate_of(&open()), None);
        assert_eq!(
            gate_of(&GateInput {
                samples: 99,
                ..open()
            }),
            Some("min_samples")
        );
        assert_eq!(
            gate_of(&GateInput {
                samples: 100,
                ..open()
            }),
            None
        );
        assert_eq!(
            gate_of(&GateInput {
                training: true,
                ..open()
            }),
            Some("already_training")
        );
        assert_eq!(
            gate_of(&GateInput {
                quality_low: Some(0.5),
                ..open()
            }),
            Some("quality")
        );
        let recent = GateInput {
            last_training_at: Some(9_900.0),
            ..open()
        };
        assert_eq!(gate_of(&recent), Some("cooldown"));
        assert_eq!(
            gate_of(&GateInput {
                cooldown: 0.0,
                ..recent
            }),
            None
        );
        assert_eq!(
            gate_of(&GateInput {
                last_training_at: Some(9_700.0),
                ..open()
            }),
            None
        );
    }

    #[test]
    fn a_key_waits_for_a_slot_only_when_nothing_else_holds_it_back() {
        let busy = GateInput {
            slot_free: false,
            slots: 2,
            ..open()
        };
        let b = gates(&busy).unwrap_err();
        assert_eq!(b.gate, "slots");
        assert!(b.detail.contains("all 2 are busy"), "{}", b.detail);
        // A key that could not train anyway says why, not that it waits for a slot.
        assert_eq!(
            gate_of(&GateInput {
                samples: 1,
                ..busy.clone()
            }),
            Some("min_samples")
        );
        assert_eq!(
            gate_of(&GateInput {
                training: true,
                ..busy
            }),
            Some("already_training")
        );
    }

    #[test]
    fn freed_slots_go_to_the_key_that_waited_longest() {
        let dir = tempfile::tempdir().unwrap();
        let keys = vec![
            "hex8_2p".to_string(),
            "hex6_2p".to_string(),
            "hex4_2p".into(),
        ];
        let mut t = TrainingTrigger {
            pipeline: Some(Pipeline::for_test(dir.path(), keys)),
            slots: 2,
            ..TrainingTrigger::default()
        };
        t.key_state("hex8_2p").last_training_at = Some(200.0);
        t.key_state("hex6_2p").last_training_at = Some(100.0);
        assert_eq!(t.keys_by_wait(), ["hex4_2p", "hex6_2p", "hex8_2p"]);
        // Slots are handed out lowest first, and a freed one is reused.
        assert_eq!(t.free_slot(), 0);
        t.training.insert("hex8_2p".into(), 0);
        assert_eq!(t.free_slot(), 1);
        t.training.insert("hex6_2p".into(), 1);
        t.training.remove("hex8_2p");
        assert_eq!(t.free_slot(), 0);
    }

    #[test]
    fn failures_back_off_exponentially() {
        assert_eq!(backoff_secs(0, 60.0), 0.0);
        assert_eq!(backoff_secs(1, 60.0), 60.0);
        assert_eq!(backoff_secs(3, 60.0), 240.0);
        // Capped at an hour: ten failures used to mean 17 hours.
        assert_eq!(backoff_secs(11, 60.0), 3600.0);
        assert_eq!(backoff_secs(50, 1.0), 3600.0);
        let failed = GateInput {
            failures: 2,
            last_failure_at: Some(9_900.0),
            ..open()
        };
        let b = gates(&failed).unwrap_err();
        assert_eq!(b.gate, "failure_backoff");
        assert!(b.detail.contains("retry in 20s"), "{}", b.detail);
        assert_eq!(
            gate_of(&GateInput {
                last_failure_at: Some(9_880.0),
                ..failed
            }),
            None
        );
    }

    /// A trigger on a pipeline at `root` whose train job is `train`, with `key` failed 9 times
    /// under the job `failed_job`.
    fn failed_trigger(root: &Path, train: &str, failed_job: Option<String>) -> TrainingTrigger {
        let mut pipeline = Pipeline::for_test(root, vec!["hex8_2p".into()]);
        pipeline.jobs.insert(
            "train".into(),
            (vec![train.into()], std::time::Duration::from_secs(3600)),
        );
        let mut t = TrainingTrigger {
            pipeline: Some(pipeline),
            ..TrainingTrigger::default()
        };
        let ks = t.key_state("hex8_2p");
        ks.failures = 9;
        ks.last_failure_at = Some(100.0);
        ks.failed_job = failed_job;
        t
    }

    #[test]
    fn a_changed_train_job_starts_without_the_old_ones_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let same = Pipeline::for_test(dir.path(), vec![]);
        let mut same_jobs = same.clone();
        same_jobs.jobs.insert(
            "train".into(),
            (vec!["a".into()], std::time::Duration::from_secs(3600)),
        );
        let fp = same_jobs.job_fingerprint("train");
        let mut t = failed_trigger(dir.path(), "a", Some(fp));
        t.forget_other_jobs();
        assert_eq!(
            t.key_state("hex8_2p").failures,
            9,
            "the same command keeps its backoff"
        );
        let mut t = failed_trigger(dir.path(), "b", Some(same_jobs.job_fingerprint("train")));
        t.forget_other_jobs();
        let ks = t.key_state("hex8_2p").clone();
        assert_eq!((ks.failures, ks.last_failure_at), (0, None));
        // Saved: a restart does not bring it back.
        let saved: State = load_state(&dir.path().join("data/coordination/training_trigger.json"));
        assert_eq!(saved.keys["hex8_2p"].failures, 0);
    }

    #[test]
    fn a_reset_forgets_the_failures_before_it_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = failed_trigger(dir.path(), "a", None);
        t.apply_reset("hex8_2p");
        assert_eq!(t.key_state("hex8_2p").failures, 9, "no reset recorded");
        ringrift::backoff::record_reset(dir.path(), "hex8_2p", 50.0).unwrap();
        t.apply_reset("hex8_2p");
        assert_eq!(
            t.key_state("hex8_2p").failures,
            9,
            "failed again after the reset"
        );
        ringrift::backoff::record_reset(dir.path(), "hex8_2p", 150.0).unwrap();
        t.apply_reset("hex8_2p");
        let ks = t.key_state("hex8_2p").clone();
        assert_eq!((ks.failures, ks.last_failure_at), (0, None));
    }

    #[test]
    fn low_quality_blocks_until_a_score_at_or_above_the_threshold() {
        let flag = apply_quality(None, "LOW_QUALITY_DATA_WARNING", 0.3, Some(0.5));
        assert_eq!(flag, Some(0.5));
        assert_eq!(
            apply_quality(flag, "QUALITY_SCORE_UPDATED", 0.49, None),
            Some(0.5)
        );
        assert_eq!(
            apply_quality(flag, "QUALITY_SCORE_UPDATED", 0.5, None),
            None
        );
        assert_eq!(
            apply_quality(None, "QUALITY_SCORE_UPDATED", 0.1, None),
            None
        );
    }

    #[test]
    fn models_are_checked_by_loading_them() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let good = dir.path().join("good.bin");
        std::fs::write(&good, Model::zeros(&config).to_bytes()).unwrap();
        check_model(&good, "hex6_2p").unwrap();
        assert!(
            check_model(&good, "hex8_2p").is_err(),
            "a model of another key"
        );
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.path().join("truncated.bin");
        std::fs::write(&truncated, &bytes[..bytes.len() - 3]).unwrap();
        assert!(check_model(&truncated, "hex6_2p").is_err());
        assert!(check_model(&dir.path().join("missing.bin"), "hex6_2p").is_err());
        // Keys the built-in game does not play: existence and size only.
        check_model(&truncated, "square8_2p").unwrap();
    }

    #[test]
    fn a_new_export_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npz");
        std::fs::write(&path, b"one").unwrap();
        let a = Fingerprint::of(&path).unwrap();
        std::fs::write(&path, b"three").unwrap();
        assert_ne!(Fingerprint::of(&path).unwrap(), a);
        assert!(count_samples(&path, "hex6_2p").is_err());
    }
}
