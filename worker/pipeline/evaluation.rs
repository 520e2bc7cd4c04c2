//! EVALUATION: plays every new candidate model through the gauntlet (against random play and the
//! canonical model) and publishes the win rates for auto_promotion.
//!
//! Why it is shaped this way:
//! - A candidate is "evaluated" exactly when `<name>.eval.json` sits next to it, written atomically
//!   by the gauntlet job. So the work list is the disk: at start-up and every cycle every candidate in
//!   models/candidates/*/ without its results file is queued. TRAINING_COMPLETED only gets one in
//!   sooner; a lost event or a worker killed mid-gauntlet costs time, not the evaluation.
//! - The queue is bounded by `queue_limit` in the sense that matters: when more candidates wait than
//!   that, BACKPRESSURE_ACTIVATED tells the producers (once per crossing, the flag survives restarts)
//!   and BACKPRESSURE_RELEASED follows when the queue has drained under the limit again.
//! - The results file records which model was played: evaluation adds `model_path` and
//!   `model_sha256` (hashed before the gauntlet and checked after it) when it publishes the
//!   gauntlet's output, so promotion can prove it installs what was evaluated. TRAINING_COMPLETED
//!   naming anything but a regular file directly in models/candidates/<key>/ is refused with
//!   EVALUATION_FAILED, and symlinks are never candidates.
//! - Up to `pipeline.capacity.evaluation_slots` gauntlets run at once, of different config keys
//!   ([`Evaluation::pool`]): prepared with the daemon (load check, hash, slot), the validate and
//!   gauntlet jobs a future that borrows nothing from it, the results settled with it. On a node
//!   in a cluster the shared queue's items are still played one at a time.
//! - A candidate that does not load is renamed to `<candidate>.bad`, so it is not retried forever. A
//!   gauntlet job that fails or overruns is retried with a growing delay, and after
//!   [`MAX_ATTEMPTS`] failures the candidate is quarantined too, with EVALUATION_FAILED each time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ringrift::config_key::ConfigKey;
use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auto_export::quarantine;
use super::confine::{confined_file, read_confined, write_replace};
use super::sha256;
use super::{
    Busy, Pipeline, Validation, job_failure, load_state, now_secs, save_or_note, stage_reports,
    typed, view_details,
};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, JobOutcome, Settings};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use ringrift::pipeline_view::Stage;
use ringrift::settings::EvaluationSettings;

mod work_items;

const NAME: &str = "evaluation";

/// While a pool runs, how often it takes the events that arrived.
const RESCAN_EVERY: Duration = Duration::from_millis(500);

/// A gauntlet decided on ([`Evaluation::prepare`]): what its jobs and its settling need.
#[derive(Debug, Clone)]
struct Prepared {
    key: String,
    candidate: PathBuf,
    /// The candidate's SHA-256, hashed before the gauntlet.
    sha: String,
    /// The baseline's SHA-256 (None: there is no canonical model yet).
    baseline: Option<String>,
    /// The gauntlet's placeholders.
    vars: Vec<(&'static str, String)>,
    /// Its slot's GPU, if the node has any.
    gpu: Option<u64>,
}

/// How an evaluation's jobs ended: the validate job refused or could not judge the model, or
/// the gauntlet ran (or could not start).
enum Ended {
    Validation(Validation),
    Gauntlet(anyhow::Result<JobOutcome>),
}

/// A running evaluation.
type EvalJob = LocalBoxFuture<'static, (Prepared, Ended)>;
/// Failed gauntlet runs of one candidate before it is quarantined.
const MAX_ATTEMPTS: u32 = 3;

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(Evaluation::default())
}

/// Where the gauntlet writes results before they are announced.
fn staging_results(candidate: &Path) -> PathBuf {
    eval_path(candidate).with_extension("json.partial")
}

/// Where the gauntlet results of `candidate` live: `<dir>/<name>.eval.json`.
pub(crate) fn eval_path(candidate: &Path) -> PathBuf {
    candidate.with_extension("eval.json")
}

/// The config key of a candidate: the name of its directory under models/candidates.
pub(crate) fn candidate_key(candidate: &Path) -> Option<String> {
    let key = candidate.parent()?.file_name()?.to_str()?;
    key.parse::<ConfigKey>().ok().map(|_| key.to_string())
}

/// Whether a file name is a candidate's: `<name>.bin`, not hidden (a job's temporary file).
pub(crate) fn candidate_name(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| !n.starts_with('.') && n.ends_with(".bin"))
}

/// Candidate model files under `candidates_root` (models/candidates): `<key>/<name>.bin`, regular
/// files (a symlink is not a candidate: it could lead anywhere), not hidden, oldest first.
pub(crate) fn candidates(candidates_root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    let Ok(dirs) = std::fs::read_dir(candidates_root) else {
        return Vec::new();
    };
    for dir in dirs.flatten() {
        let dir = dir.path();
        if !dir.is_dir() || candidate_key(&dir.join("x.bin")).is_none() {
            continue;
        }
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            // `DirEntry::file_type` does not follow symlinks.
            if !candidate_name(&path) || !file.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let mtime = file
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((mtime, path));
        }
    }
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// A backpressure transition: `Some(true)` activate, `Some(false)` release, `None` no change.
/// Activates once the queue is deeper than `limit`; releases once it is back under it (or empty).
fn backpressure(active: bool, depth: usize, limit: usize) -> Option<bool> {
    if !active && depth > limit {
        Some(true)
    } else if active && (depth < limit || depth == 0) {
        Some(false)
    } else {
        None
    }
}

/// The gauntlet's results as EVALUATION_COMPLETED reports them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Results {
    pub win_rate_vs_random: f64,
    pub win_rate_vs_baseline: Option<f64>,
    pub games: u64,
    /// The sequential test against the baseline, when the gauntlet ran one.
    pub sprt: Option<SprtOutcome>,
}

/// How the gauntlet's sequential test against the baseline ended (`ringrift::sprt`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SprtOutcome {
    /// `accept`, `reject` or `inconclusive` (the games ran out first).
    pub result: String,
    /// The log-likelihood ratio reached.
    pub llr: f64,
    /// The bound at which it accepts.
    pub upper: f64,
}

/// The `sprt` object of a results file, if any.
fn parse_sprt(v: &Value, path: &Path) -> anyhow::Result<Option<SprtOutcome>> {
    let Some(t) = v.get("sprt").filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    let result = t.get("result").and_then(Value::as_str);
    let number = |f: &str| t.get(f).and_then(Value::as_f64);
    match (result, number("llr"), number("upper")) {
        (Some(r @ ("accept" | "reject" | "inconclusive")), Some(llr), Some(upper)) => {
            Ok(Some(SprtOutcome {
                result: r.to_string(),
                llr,
                upper,
            }))
        }
        _ => anyhow::bail!(
            "{}: sprt is {t}, not {{result: accept|reject|inconclusive, llr, upper}}",
            path.display()
        ),
    }
}

/// Reads a gauntlet results file (`games_vs_random` gives the games; `default_games` if absent).
pub(crate) fn read_results(path: &Path, default_games: u64) -> anyhow::Result<Results> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    parse_results(&v, path, default_games)
}

fn parse_results(v: &Value, path: &Path, default_games: u64) -> anyhow::Result<Results> {
    let rate = |field: &str| -> anyhow::Result<Option<f64>> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_f64() {
                Some(r) if (0.0..=1.0).contains(&r) => Ok(Some(r)),
                _ => anyhow::bail!("{}: {field} is {x}, not a rate in [0, 1]", path.display()),
            },
        }
    };
    let win_rate_vs_random = rate("win_rate_vs_random")?
        .with_context(|| format!("{} has no win_rate_vs_random", path.display()))?;
    let games = match v.get("games_vs_random") {
        None | Some(Value::Null) => default_games,
        Some(g) => g
            .as_u64()
            .with_context(|| format!("{}: games_vs_random is {g}, not a count", path.display()))?,
    };
    Ok(Results {
        win_rate_vs_random,
        win_rate_vs_baseline: rate("win_rate_vs_baseline")?,
        games,
        sprt: parse_sprt(v, path)?,
    })
}

/// A results file as evaluation publishes it: the gauntlet's numbers, and which model was played
/// (recorded by this daemon, not the gauntlet job: its path and SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub results: Results,
    pub model_path: Option<String>,
    pub model_sha256: Option<String>,
    /// The SHA-256 of the canonical model the gauntlet played as the baseline (None: there was
    /// none, or an older version wrote the file).
    pub baseline_sha256: Option<String>,
    /// The whole file, as written (kept with a promotion in the ratings DB).
    pub raw: Value,
}

/// Reads the published results of `candidate` (`<name>.eval.json` beside it), confined to
/// `candidates_dir` like any file the loop acts on.
pub(crate) fn read_record(candidates_dir: &Path, candidate: &Path) -> anyhow::Result<Record> {
    let path = eval_path(candidate);
    let (bytes, _, _) = read_confined(candidates_dir, &path)?;
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let text = |field: &str| v.get(field).and_then(Value::as_str).map(str::to_string);
    Ok(Record {
        results: parse_results(&v, &path, 0)?,
        model_path: text("model_path"),
        model_sha256: text("model_sha256"),
        baseline_sha256: text("baseline_sha256"),
        raw: v,
    })
}

/// The SHA-256 of a candidate's content, read through one confined handle.
fn candidate_sha(candidate: &Path) -> anyhow::Result<String> {
    let dir = candidate
        .parent()
        .context("the candidate has no directory")?;
    let (bytes, _, _) = read_confined(dir, candidate)?;
    Ok(sha256::hex_of(&bytes))
}

/// Moves the gauntlet's results from `staging` into place as `<name>.eval.json`, adding which
/// model was played: `model_path` and `model_sha256` (promotion installs a candidate only if its
/// content still has this hash).
fn publish_results(
    candidate: &Path,
    staging: &Path,
    results: &Results,
    sha: &str,
    baseline: Option<&str>,
) -> anyhow::Result<()> {
    let model_path = candidate.display().to_string();
    write_results(
        &eval_path(candidate),
        staging,
        results,
        sha,
        &model_path,
        baseline,
    )
}

/// Writes the results file `dest` from the gauntlet's `staging` output, recording `model_path`
/// (where the candidate is on the node that trained it) and `sha` as the model played, and
/// `baseline` as the SHA-256 of the canonical model it played against (promotion re-evaluates a
/// candidate measured against another model than its own canonical one).
fn write_results(
    dest: &Path,
    staging: &Path,
    results: &Results,
    sha: &str,
    model_path: &str,
    baseline: Option<&str>,
) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(staging).with_context(|| format!("cannot read {}", staging.display()))?;
    let mut v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", staging.display()))?;
    let obj = v
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", staging.display()))?;
    obj.insert("model_path".into(), model_path.into());
    obj.insert("model_sha256".into(), sha.into());
    if let Some(b) = baseline {
        obj.insert("baseline_sha256".into(), b.into());
    }
    // The games the numbers are over, as announced (a gauntlet of the user's own may not say).
    obj.insert("games_vs_random".into(), results.games.into());
    let mut text = serde_json::to_vec_pretty(&v)?;
    text.push(b'\n');
    write_replace(dest, &text, 0o644, |_| Ok(()))?;
    let _ = std::fs::remove_file(staging);
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Failed gauntlet runs per candidate path.
    attempts: BTreeMap<String, u32>,
    backpressure_active: bool,
    /// The fingerprint of the gauntlet (and validate) job templates those attempts failed with:
    /// attempts of another command are forgotten when the worker starts.
    #[serde(default)]
    attempts_job: Option<String>,
    /// Per config key, the operator's last backoff reset already applied (unix seconds; see
    /// [`ringrift::backoff`]).
    #[serde(default)]
    resets_applied: BTreeMap<String, f64>,
}

#[derive(Default)]
struct Evaluation {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    games: u64,
    /// The sequential test against the baseline (the gauntlet's `{sprt}`), if on.
    sprt: Option<ringrift::sprt::Sprt>,
    limit: usize,
    retry_delay: f64,
    /// `pipeline.capacity.evaluation_slots`.
    slots: usize,
    /// `pipeline.capacity.gpus` (detected when not configured).
    gpus: u64,
    /// The daemon's `interval`: how often a running pool publishes health.
    interval: Duration,
    /// Keys whose gauntlet runs now → its slot and candidate.
    running: BTreeMap<String, (usize, PathBuf)>,
    state: State,
    queue: VecDeque<PathBuf>,
    /// Candidates whose last gauntlet failed: not retried before this unix time.
    not_before: BTreeMap<PathBuf, f64>,
    last: String,
    last_ok: bool,
    last_error: Option<String>,
    started: u64,
    completed: u64,
    failed: u64,
    quarantined: u64,
    activations: u64,
    refused: u64,
    /// In a cluster: this node's candidates whose evaluation item was set aside, with its id.
    set_aside: BTreeMap<PathBuf, i64>,
    /// In a cluster: the SHA-256 of each candidate offered, by its length and modification time.
    shas: BTreeMap<PathBuf, (u64, std::time::SystemTime, String)>,
    /// In a cluster: candidates of other nodes evaluated here.
    remote: u64,
    /// In a cluster: this node's candidates offered to the cluster, with their item's id.
    offered: BTreeMap<PathBuf, i64>,
    /// Keys with a gauntlet job running now (stage `evaluation` of the per-key view).
    playing: Busy,
}

impl Evaluation {
    fn report(&self) -> Report {
        let depth = self.queue.len();
        let message = format!(
            "{} waiting (limit {}){}{}{}; last: {}",
            depth,
            self.limit,
            match self
                .offered
                .values()
                .map(|id| format!("#{id}"))
                .collect::<Vec<_>>()
            {
                ids if ids.is_empty() => String::new(),
                ids => format!(", offered to the cluster as item {}", ids.join(" ")),
            },
            match self.set_aside.values().next() {
                None => String::new(),
                Some(id) => format!(
                    ", {} set aside by the cluster (queue retry {id} evaluates it again)",
                    self.set_aside.len()
                ),
            },
            if self.state.backpressure_active {
                ", backpressure active"
            } else {
                ""
            },
            if self.last.is_empty() {
                "nothing evaluated yet"
            } else {
                &self.last
            }
        );
        let message = if self.running.is_empty() {
            message
        } else {
            let names: Vec<String> = self
                .running
                .values()
                .map(|(_, c)| c.display().to_string())
                .collect();
            format!(
                "evaluating {} ({} of {} slots); {message}",
                names.join(", "),
                self.running.len(),
                self.slots
            )
        };
        let status = if !self.last_ok {
            "degraded"
        } else if self.state.backpressure_active {
            "backpressure"
        } else {
            "ok"
        };
        let mut details = BTreeMap::from([
            ("queue_depth".to_string(), Value::from(depth)),
            ("queue_limit".to_string(), Value::from(self.limit)),
            ("evaluation_slots".to_string(), Value::from(self.slots)),
            (
                "running".to_string(),
                json!(
                    self.running
                        .iter()
                        .map(|(k, (slot, c))| (
                            k.clone(),
                            json!({"slot": slot, "candidate": c.display().to_string()})
                        ))
                        .collect::<serde_json::Map<String, Value>>()
                ),
            ),
            (
                "queue".to_string(),
                json!(
                    self.queue
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                ),
            ),
            (
                "backpressure_active".to_string(),
                Value::from(self.state.backpressure_active),
            ),
            ("last_error".to_string(), json!(self.last_error)),
        ]);
        view_details(
            &mut details,
            stage_reports(
                self.playing
                    .keys()
                    .chain(self.running.keys())
                    .cloned()
                    .collect::<BTreeSet<_>>(),
                Stage::Evaluation,
            ),
        );
        Report::with_status(
            self.last_ok,
            status,
            message,
            details,
            [
                ("evaluations_started", self.started),
                ("evaluations_completed", self.completed),
                ("evaluation_failures", self.failed),
                ("quarantined", self.quarantined),
                ("backpressure_activations", self.activations),
                ("refused_events", self.refused),
                ("evaluated_for_other_nodes", self.remote),
            ],
        )
    }

    fn save(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        save_or_note(pipeline, NAME, &self.state, &mut self.last_error);
    }

    fn enqueue(&mut self, candidate: PathBuf) {
        if !self.queue.contains(&candidate) && !self.is_running(&candidate) {
            println!("{NAME}: queued {}", candidate.display());
            self.queue.push_back(candidate);
        }
    }

    /// Whether `candidate`'s gauntlet runs now.
    fn is_running(&self, candidate: &Path) -> bool {
        self.running.values().any(|(_, c)| c == candidate)
    }

    /// Queues every candidate on disk without results (and not waiting out a failure, nor being
    /// evaluated).
    fn scan(&mut self) {
        let root = self
            .pipeline
            .as_ref()
            .expect("started")
            .root
            .join("models/candidates");
        let now = now_secs();
        self.not_before.retain(|_, t| *t > now);
        // A gauntlet that finished while this daemon was down left complete staging results:
        // announce them instead of playing the gauntlet again.
        for c in candidates(&root) {
            let staging = staging_results(&c);
            if !eval_path(&c).exists()
                && staging.exists()
                && let (Some(key), Ok(results), Ok(sha)) = (
                    candidate_key(&c),
                    read_results(&staging, self.games),
                    candidate_sha(&c),
                )
                && publish_results(&c, &staging, &results, &sha, None).is_ok()
            {
                println!(
                    "{NAME}: {}: results of an interrupted evaluation recovered",
                    c.display()
                );
                self.announce(&key, &c, &results);
            }
        }
        let on_disk: BTreeSet<PathBuf> = candidates(&root)
            .into_iter()
            .filter(|c| !eval_path(c).exists())
            .collect();
        // Drop what was evaluated, quarantined or deleted meanwhile, and what the cluster set
        // aside (offered again each cycle, see `offer`, but not waiting).
        self.set_aside.retain(|c, _| on_disk.contains(c));
        let running: BTreeSet<PathBuf> = self.running.values().map(|(_, c)| c.clone()).collect();
        self.queue.retain(|c| {
            on_disk.contains(c) && !self.set_aside.contains_key(c) && !running.contains(c)
        });
        for c in candidates(&root) {
            if on_disk.contains(&c)
                && !self.not_before.contains_key(&c)
                && !self.set_aside.contains_key(&c)
            {
                self.enqueue(c);
            }
        }
        self.update_backpressure();
    }

    fn update_backpressure(&mut self) {
        let depth = self.queue.len();
        let Some(activate) = backpressure(self.state.backpressure_active, depth, self.limit) else {
            return;
        };
        self.state.backpressure_active = activate;
        self.save();
        let event = if activate {
            self.activations += 1;
            "BACKPRESSURE_ACTIVATED"
        } else {
            "BACKPRESSURE_RELEASED"
        };
        println!(
            "{NAME}: {event}: {depth} candidates waiting, limit {}",
            self.limit
        );
        self.ctx.as_ref().expect("attached").emit(
            event,
            payload([
                ("queue", "evaluation".into()),
                ("depth", depth.into()),
                ("limit", self.limit.into()),
            ]),
        );
    }

    /// Evaluates queued candidates until the queue is empty, up to `evaluation_slots` at once
    /// ([`Evaluation::pool`]; in a cluster: offers them to the cluster, and evaluates the
    /// cluster's items one at a time if this node evaluates).
    async fn drain(&mut self) {
        if self.pipeline.as_ref().expect("started").shared_queue {
            self.drain_shared().await;
            return;
        }
        self.pool().await;
    }

    fn fail(&mut self, key: &str, candidate: &Path, error: String) {
        self.failed += 1;
        self.last_ok = false;
        self.last = format!(
            "{} failed at {}: {error}",
            candidate.display(),
            ringrift::timefmt::now_rfc3339()
        );
        self.last_error = Some(self.last.clone());
        eprintln!("{NAME}: {}", self.last);
        self.ctx.as_ref().expect("attached").emit(
            "EVALUATION_FAILED",
            payload([
                ("config_key", key.into()),
                ("model_path", candidate.display().to_string().into()),
                ("error", error.into()),
            ]),
        );
    }

    /// An event naming a file this daemon does not act on: reported as EVALUATION_FAILED (naming
    /// the path and why) without touching any candidate or the daemon's health.
    fn refuse(&mut self, key: &str, path: &str, why: String) {
        self.refused += 1;
        let error = format!("refused TRAINING_COMPLETED: {why}");
        eprintln!("{NAME}: {key}: {error}");
        self.last_error = Some(format!("{} {error}", ringrift::timefmt::now_rfc3339()));
        self.ctx.as_ref().expect("attached").emit(
            "EVALUATION_FAILED",
            payload([
                ("config_key", key.into()),
                ("model_path", path.into()),
                ("error", error.into()),
            ]),
        );
    }

    /// The fingerprint of the job templates a failed attempt is charged to: the gauntlet's, and
    /// the validate job's when there is one.
    fn jobs_fingerprint(&self) -> String {
        let pipeline = self.pipeline.as_ref().expect("started");
        format!(
            "{}{}",
            pipeline.job_fingerprint("gauntlet"),
            pipeline.job_fingerprint("validate")
        )
    }

    /// Forgets failed attempts the operator reset since (`pipeline reset-backoff KEY`): the
    /// key's candidates get their full count of attempts again, and no retry wait.
    fn apply_resets(&mut self) {
        let root = self.pipeline.as_ref().expect("started").root.clone();
        let mut changed = false;
        for (key, at) in ringrift::backoff::read_resets(&root) {
            if self
                .state
                .resets_applied
                .get(&key)
                .is_some_and(|a| *a >= at)
            {
                continue;
            }
            let of_key = |path: &Path| candidate_key(path).as_deref() == Some(key.as_str());
            let before = self.state.attempts.len() + self.not_before.len();
            self.state.attempts.retain(|c, _| !of_key(Path::new(c)));
            self.not_before.retain(|c, _| !of_key(c));
            let forgot = before - self.state.attempts.len() - self.not_before.len();
            if forgot > 0 {
                println!("{NAME}: {key}: failed attempts reset by the operator");
            }
            self.state.resets_applied.insert(key, at);
            changed = true;
        }
        if changed {
            self.save();
        }
    }

    /// A failed gauntlet run: retry later, or quarantine after [`MAX_ATTEMPTS`].
    fn failed_attempt(&mut self, key: &str, candidate: &Path, error: String) {
        let id = candidate.display().to_string();
        self.state.attempts_job = Some(self.jobs_fingerprint());
        let attempts = {
            let n = self.state.attempts.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let error = if attempts >= MAX_ATTEMPTS {
            self.state.attempts.remove(&id);
            self.quarantined += 1;
            let moved = quarantine(candidate)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!(
                "{error}; attempt {attempts} of {MAX_ATTEMPTS}: candidate quarantined as {moved}"
            )
        } else {
            let delay = self.retry_delay * f64::from(1u32 << (attempts - 1));
            self.not_before
                .insert(candidate.to_path_buf(), now_secs() + delay);
            format!("{error}; attempt {attempts} of {MAX_ATTEMPTS}: retrying in {delay:.0}s")
        };
        self.save();
        self.fail(key, candidate, error);
    }

    /// The synchronous start of `candidate`'s evaluation in slot `slot`: checks that it loads
    /// (quarantined otherwise) and hashes it. None when it cannot be played (said already).
    fn prepare(&mut self, candidate: &Path, slot: usize) -> Option<Prepared> {
        let key = candidate_key(candidate)?;
        let pipeline = self.pipeline.clone().expect("started");
        if let Err(e) = pipeline.check_model(candidate, &key) {
            self.quarantined += 1;
            let moved = quarantine(candidate)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            self.fail(
                &key,
                candidate,
                format!("candidate does not load ({e:#}); quarantined as {moved}"),
            );
            return None;
        }
        // What is played is recorded by content: promotion installs only a candidate whose hash
        // is the one evaluated.
        let sha = match candidate_sha(candidate) {
            Ok(sha) => sha,
            Err(e) => {
                self.failed_attempt(&key, candidate, format!("cannot read the candidate: {e:#}"));
                return None;
            }
        };
        // The job's `{model_path}` is the baseline: this node's canonical model.
        let baseline_path = pipeline.canonical(&key);
        let baseline = sha256::file_hex(&baseline_path).ok();
        let gpu = super::gpu_for_slot(pipeline.capacity.training_slots, slot, self.gpus);
        self.started += 1;
        println!(
            "{NAME}: {key}: gauntlet for {} ({} games per opponent; slot {slot}{})",
            candidate.display(),
            self.games,
            gpu.map_or(String::new(), |g| format!(", GPU {g}"))
        );
        self.running
            .insert(key.clone(), (slot, candidate.to_path_buf()));
        Some(Prepared {
            vars: self.gauntlet_vars(&key, candidate, &baseline_path),
            key,
            candidate: candidate.to_path_buf(),
            sha,
            baseline,
            gpu,
        })
    }

    /// The validate job (if any) and the gauntlet job of prepared evaluation `p`: a future that
    /// borrows nothing from the daemon.
    fn launch(&self, p: Prepared) -> EvalJob {
        let pipeline = self.pipeline.clone().expect("started");
        let ctx = self.ctx.clone().expect("attached");
        Box::pin(async move {
            // A format of the user's own is checked by their validate job, before any game.
            let validation = pipeline.validate_model(&ctx, &p.candidate, &p.key).await;
            if !matches!(validation, Validation::NotConfigured | Validation::Valid) {
                return (p, Ended::Validation(validation));
            }
            let env = p
                .gpu
                .map(|g| {
                    (
                        super::training_trigger::CUDA_VISIBLE_DEVICES.to_string(),
                        g.to_string(),
                    )
                })
                .into_iter()
                .collect();
            let vars: Vec<(&str, String)> = p.vars.iter().map(|(k, v)| (*k, v.clone())).collect();
            let outcome = pipeline
                .run_job_env(&ctx, "gauntlet", &p.key, &vars, None, env)
                .await;
            (p, Ended::Gauntlet(outcome))
        })
    }

    /// The synchronous end of evaluation `p`: frees its slot, publishes and announces its
    /// results (EVALUATION_COMPLETED), or records the failure (a retry later, or quarantine).
    fn settle(&mut self, p: Prepared, ended: Ended) {
        self.running.remove(&p.key);
        let (key, candidate) = (p.key.as_str(), p.candidate.as_path());
        let outcome = match ended {
            Ended::Validation(Validation::Invalid(why)) => {
                self.quarantined += 1;
                let moved = quarantine(candidate)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                self.fail(key, candidate, format!("{why}; quarantined as {moved}"));
                return;
            }
            Ended::Validation(Validation::NotRun(why)) => {
                self.failed_attempt(key, candidate, why);
                return;
            }
            Ended::Validation(_) => return,
            Ended::Gauntlet(outcome) => outcome,
        };
        let results = outcome
            .map_err(|e| format!("cannot start the gauntlet job: {e:#}"))
            .and_then(|o| self.gauntlet_results(&o, candidate, &p.sha));
        let results = match results {
            Ok(r) => r,
            Err(error) => {
                self.failed_attempt(key, candidate, error);
                return;
            }
        };
        let staging = staging_results(candidate);
        if let Err(e) =
            publish_results(candidate, &staging, &results, &p.sha, p.baseline.as_deref())
        {
            let error = format!("cannot move {} into place: {e:#}", staging.display());
            self.failed_attempt(key, candidate, error);
            return;
        }
        if self
            .state
            .attempts
            .remove(&candidate.display().to_string())
            .is_some()
        {
            self.save();
        }
        self.announce(key, candidate, &results);
    }

    /// Starts the evaluation of queued candidates, oldest first, as slots allow: at most one per
    /// config key at a time (a key's later candidate waits for the earlier one's gauntlet).
    fn fill(&mut self, running: &mut FuturesUnordered<EvalJob>) {
        let mut waiting = VecDeque::new();
        while self.running.len() < self.slots {
            let Some(candidate) = self.queue.pop_front() else {
                break;
            };
            let busy = candidate_key(&candidate).is_some_and(|k| self.running.contains_key(&k));
            if busy {
                waiting.push_back(candidate);
                continue;
            }
            if !candidate.exists() || eval_path(&candidate).exists() {
                continue;
            }
            let slot = (0..self.slots)
                .find(|s| !self.running.values().any(|(held, _)| held == s))
                .unwrap_or(0);
            match self.prepare(&candidate, slot) {
                Some(p) => running.push(self.launch(p)),
                None => self.never_loop(candidate),
            }
        }
        // Those of busy keys keep their place at the front.
        while let Some(c) = waiting.pop_back() {
            self.queue.push_front(c);
        }
        self.update_backpressure();
    }

    /// Whatever went wrong with `candidate` (even a quarantine that could not rename), it is
    /// not tried again before the retry delay.
    fn never_loop(&mut self, candidate: PathBuf) {
        if candidate.exists() && !eval_path(&candidate).exists() {
            let retry = now_secs() + self.retry_delay;
            self.not_before.entry(candidate).or_insert(retry);
        }
    }

    /// Keeps up to `evaluation_slots` gauntlets running, across config keys, until the queue
    /// is empty: the disk is scanned again whenever a gauntlet ends, whenever events arrived
    /// (taken and applied between gauntlets within [`RESCAN_EVERY`]: a candidate trained
    /// meanwhile starts at once in a free slot), and every `interval`. It starts no more when
    /// the daemon stops, pauses or stands by, and returns once none runs.
    async fn pool(&mut self) {
        let ctx = self.ctx.clone().expect("attached");
        let mut running: FuturesUnordered<EvalJob> = FuturesUnordered::new();
        let mut look = Instant::now() + RESCAN_EVERY;
        let mut publish = Instant::now() + self.interval;
        loop {
            // Events that arrived meanwhile are taken between gauntlets (and acknowledged).
            let mut taken = false;
            while let Some(event) = ctx.take_event() {
                let _ = self.apply_event(&event);
                ctx.ack(event.seq);
                taken = true;
            }
            if taken {
                self.scan();
            }
            if !ctx.winding_down() {
                self.fill(&mut running);
            }
            if running.is_empty() {
                break;
            }
            let next = tokio::select! {
                next = running.next() => next,
                () = tokio::time::sleep_until(look.min(publish).into()) => None,
            };
            let mut rescan = false;
            if let Some((p, ended)) = next {
                let candidate = p.candidate.clone();
                self.settle(p, ended);
                self.never_loop(candidate);
                // EVALUATION_COMPLETED goes out before the next gauntlet.
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
            if rescan {
                // Candidates trained meanwhile count towards the depth at once.
                self.scan();
            }
            // Which candidates run shows at the next heartbeat, not only at the cycle's end.
            ctx.publish(self.report());
        }
    }

    /// The gauntlet's placeholders for `candidate` of `key` against `baseline_path`.
    fn gauntlet_vars(
        &self,
        key: &str,
        candidate: &Path,
        baseline_path: &Path,
    ) -> Vec<(&'static str, String)> {
        let pipeline = self.pipeline.as_ref().expect("started");
        vec![
            ("candidate_path", candidate.display().to_string()),
            ("games", self.games.to_string()),
            (
                "output_path",
                staging_results(candidate).display().to_string(),
            ),
            ("model_path", baseline_path.display().to_string()),
            (
                "reference_dir",
                pipeline.reference_dir(key).display().to_string(),
            ),
            (
                "sprt",
                self.sprt
                    .map_or_else(|| "off".to_string(), |t| t.to_string()),
            ),
        ]
    }

    /// The results a gauntlet job that ended with `outcome` left in `candidate`'s staging file,
    /// checked (and the candidate still the one hashed `sha`), or why there are none.
    fn gauntlet_results(
        &self,
        outcome: &JobOutcome,
        candidate: &Path,
        sha: &str,
    ) -> Result<Results, String> {
        let staging = staging_results(candidate);
        if !outcome.success {
            return Err(job_failure("gauntlet", outcome));
        }
        let results = read_results(&staging, self.games).map_err(|e| {
            if staging.exists() {
                quarantine(&staging);
            }
            format!(
                "gauntlet job {} wrote no usable results: {e:#}",
                outcome.job_id
            )
        })?;
        if candidate_sha(candidate).ok().as_deref() != Some(sha) {
            let _ = std::fs::remove_file(&staging);
            return Err(format!(
                "{} changed while its gauntlet ran; its results are discarded",
                candidate.display()
            ));
        }
        Ok(results)
    }

    /// Plays `candidate` (whose content has SHA-256 `sha`) through the gauntlet job, bound to the
    /// shared queue's item `item` if any, against `baseline` (default: this node's canonical
    /// model; a path with no file: no baseline): its results, in the staging file beside it
    /// ([`staging_results`]), and the baseline's SHA-256 (None: there was none), or why there
    /// are none.
    async fn gauntlet(
        &mut self,
        key: &str,
        candidate: &Path,
        sha: &str,
        item: Option<i64>,
        baseline: Option<&Path>,
    ) -> Result<(Results, Option<String>), String> {
        let pipeline = self.pipeline.clone().expect("started");
        let ctx = self.ctx.clone().expect("attached");
        // The job's `{model_path}` is the baseline.
        let baseline_path = baseline.map_or_else(|| pipeline.canonical(key), Path::to_path_buf);
        let baseline = sha256::file_hex(&baseline_path).ok();
        // The gauntlet writes a staging file; it becomes the results file (which promotion looks
        // for) just before EVALUATION_COMPLETED, so promotion never decides ahead of the event.
        let vars = self.gauntlet_vars(key, candidate, &baseline_path);
        self.started += 1;
        println!(
            "{NAME}: {key}: gauntlet for {} ({} games per opponent)",
            candidate.display(),
            self.games
        );
        if self.playing.start(key) {
            ctx.publish(self.report());
        }
        let outcome = pipeline
            .run_job_for(&ctx, "gauntlet", key, &vars, item)
            .await;
        self.playing.end(key);
        let outcome = outcome.map_err(|e| format!("cannot start the gauntlet job: {e:#}"))?;
        let results = self.gauntlet_results(&outcome, candidate, sha)?;
        Ok((results, baseline))
    }

    /// Queues the candidate a TRAINING_COMPLETED names (or refuses the event, naming why).
    /// None when the event is not this daemon's to act on (another node's candidate, which
    /// reaches this node, if at all, as an evaluation item of the shared queue). Used by
    /// [`Daemon::on_event`] and, for events that arrive while gauntlets run, by the pool.
    fn apply_event(&mut self, event: &Event) -> Option<()> {
        if let Some(node) = &event.node {
            println!(
                "{NAME}: event {} is node {node}'s: its candidate is evaluated through the shared queue",
                event.id
            );
            return None;
        }
        let pipeline = self.pipeline.clone().expect("started");
        let key = pipeline.event_config_key(NAME, event)?;
        let path = event
            .payload
            .get("model_path")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let dir = pipeline.candidates_dir(&key);
        match confined_file(&dir, Path::new(path)) {
            Err(e) => self.refuse(&key, path, format!("model_path: {e}")),
            Ok(c) if c.parent() != Some(dir.as_path()) || !candidate_name(&c) => self.refuse(
                &key,
                path,
                format!(
                    "model_path: {path} is not a candidate (<name>.bin directly in {})",
                    dir.display()
                ),
            ),
            Ok(c) if !eval_path(&c).exists() => self.enqueue(c),
            Ok(_) => {}
        }
        Some(())
    }

    /// Records and publishes a finished evaluation.
    fn announce(&mut self, key: &str, candidate: &Path, results: &Results) {
        let model_path = candidate.display().to_string();
        let results_path = eval_path(candidate).display().to_string();
        self.announce_as(key, &model_path, &results_path, results, None);
    }

    /// Records and publishes a finished evaluation of the candidate at `model_path` (on
    /// `candidate_node`, when another node trained it), whose results are at `results_path`
    /// there.
    fn announce_as(
        &mut self,
        key: &str,
        model_path: &str,
        results_path: &str,
        results: &Results,
        candidate_node: Option<&str>,
    ) {
        let ctx = self.ctx.clone().expect("attached");
        self.completed += 1;
        self.last_ok = true;
        self.last = format!(
            "{model_path}{} at {}: {:.3} vs random, {}, {} games",
            candidate_node.map_or(String::new(), |n| format!(" (of node {n})")),
            ringrift::timefmt::now_rfc3339(),
            results.win_rate_vs_random,
            results
                .win_rate_vs_baseline
                .map_or("no baseline".to_string(), |r| format!("{r:.3} vs baseline")),
            results.games
        );
        println!("{NAME}: evaluated {}", self.last);
        let mut p = payload([
            ("config_key", key.into()),
            ("model_path", model_path.into()),
            ("win_rate_vs_random", results.win_rate_vs_random.into()),
            ("win_rate_vs_baseline", json!(results.win_rate_vs_baseline)),
            ("games", results.games.into()),
            ("results_path", results_path.into()),
        ]);
        if let (Some(n), Some(obj)) = (candidate_node, p.as_object_mut()) {
            obj.insert("candidate_node".into(), n.into());
        }
        ctx.emit("EVALUATION_COMPLETED", p);
    }
}

impl Daemon for Evaluation {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["TRAINING_COMPLETED".into()]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, EvaluationSettings::from_map)?;
            self.games = s.games;
            self.sprt = s.sprt;
            self.limit = usize::try_from(s.queue_limit).unwrap_or(usize::MAX);
            self.retry_delay = settings.interval_secs;
            self.slots = pipeline.capacity.evaluation_slots.max(1);
            self.gpus = pipeline.capacity.resolve_gpus();
            self.interval = settings.interval;
            self.state = load_state(&pipeline.state_path(NAME));
            self.last_ok = true;
            let fingerprint = format!(
                "{}{}",
                pipeline.job_fingerprint("gauntlet"),
                pipeline.job_fingerprint("validate")
            );
            if !self.state.attempts.is_empty()
                && self.state.attempts_job.as_deref() != Some(fingerprint.as_str())
            {
                println!(
                    "{NAME}: the gauntlet job changed since the last failed attempts: {} candidate(s) start afresh",
                    self.state.attempts.len()
                );
                self.state.attempts.clear();
                self.state.attempts_job = None;
            }
            println!(
                "{NAME}: {} games per opponent, queue limit {}{}",
                self.games,
                self.limit,
                if self.state.backpressure_active {
                    " (backpressure was active at the last stop)"
                } else {
                    ""
                }
            );
            self.pipeline = Some(pipeline);
            // Candidates never evaluated are queued now; the first cycle evaluates them.
            self.scan();
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.apply_resets();
            self.scan();
            // Recovered results announced by the scan go out before the next gauntlet.
            tokio::task::yield_now().await;
            self.drain().await;
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            self.apply_event(&event)?;
            self.scan();
            self.drain().await;
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backpressure_activates_once_beyond_the_limit_and_releases_under_it() {
        assert_eq!(backpressure(false, 4, 4), None);
        assert_eq!(backpressure(false, 5, 4), Some(true));
        assert_eq!(backpressure(true, 6, 4), None, "once per crossing");
        assert_eq!(backpressure(true, 4, 4), None);
        assert_eq!(backpressure(true, 3, 4), Some(false));
        assert_eq!(backpressure(false, 0, 4), None);
        assert_eq!(backpressure(false, 1, 0), Some(true));
        assert_eq!(backpressure(true, 0, 0), Some(false));
    }

    #[test]
    fn scans_find_candidates_without_results_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("models/candidates");
        let key_dir = root.join("hex8_2p");
        std::fs::create_dir_all(&key_dir).unwrap();
        std::fs::create_dir_all(root.join("not_a_key")).unwrap();
        for name in [
            "hex8_2p-1.bin",
            "hex8_2p-2.bin",
            ".hex8_2p-3.bin.tmp.9",
            "hex8_2p-4.bin.bad",
        ] {
            std::fs::write(key_dir.join(name), b"m").unwrap();
        }
        std::fs::write(root.join("not_a_key/x.bin"), b"m").unwrap();
        let found = candidates(&root);
        assert_eq!(
            found,
            vec![key_dir.join("hex8_2p-1.bin"), key_dir.join("hex8_2p-2.bin")]
        );
        assert_eq!(eval_path(&found[0]), key_dir.join("hex8_2p-1.eval.json"));
        assert_eq!(candidate_key(&found[0]).as_deref(), Some("hex8_2p"));
        assert!(candidates(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn results_are_read_with_or_without_a_baseline_and_garbage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.eval.json");
        std::fs::write(
            &path,
            r#"{"win_rate_vs_random":0.8,"win_rate_vs_baseline":null,"games_vs_random":100}"#,
        )
        .unwrap();
        assert_eq!(
            read_results(&path, 7).unwrap(),
            Results {
                win_rate_vs_random: 0.8,
                win_rate_vs_baseline: None,
                games: 100,
                sprt: None
            }
        );
        std::fs::write(
            &path,
            r#"{"win_rate_vs_random":0.8,"win_rate_vs_baseline":0.55}"#,
        )
        .unwrap();
        assert_eq!(
            read_results(&path, 7).unwrap().win_rate_vs_baseline,
            Some(0.55)
        );
        assert_eq!(read_results(&path, 7).unwrap().games, 7);
        std::fs::write(&path, r#"{"win_rate_vs_random":1.5}"#).unwrap();
        assert!(read_results(&path, 7).is_err());
        std::fs::write(&path, r#"{"win_rate_vs_baseline":0.5}"#).unwrap();
        assert!(read_results(&path, 7).is_err());
        std::fs::write(&path, b"{trunc").unwrap();
        assert!(read_results(&path, 7).is_err());
    }
}
