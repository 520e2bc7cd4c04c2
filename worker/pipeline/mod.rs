//! What the pipeline daemons share: where the loop's files live, the job command templates from
//! the configuration, small persistent state files, and settings helpers.
//!
//! Layout under the root (every daemon agrees on it):
//! ```text
//! data/games/<key>.db                  selfplay games (SQLite)
//! data/work_queue.db                   selfplay work items
//! data/training/<key>.npz              the latest export
//! data/coordination/<daemon>.json      each daemon's state, kept across restarts
//! models/candidates/<key>/<name>.bin   trained candidates (+ <name>.eval.json once evaluated)
//! models/canonical_<key>.bin           the canonical model; models/ringrift_best_<key> links to it
//! models/backup/                       canonical models replaced by a promotion
//! models/reference/<key>/gen-<N>.bin   pinned past generations (the gauntlet's reference opponents)
//! data/ratings.db                      the rating ladder and the promotion record (SQLite)
//! ```
//!
//! A path named in an event is acted on only if it is a regular file in the step's own directory
//! (see [`confine`] and [`Pipeline::check_event_path`]).

pub(crate) mod auto_export;
pub(crate) mod auto_promotion;
pub(crate) mod auto_sync;
pub(crate) mod canonical;
pub(crate) mod cluster_data_sync;
pub(crate) mod confine;
pub(crate) mod evaluation;
pub(crate) mod games_db;
pub(crate) mod idle_resource;
pub(crate) mod model_distribution;
pub(crate) mod quality_monitor;
pub(crate) mod queue_populator;
pub(crate) mod ratings_db;
pub(crate) mod retry;
pub(crate) mod selfplay_scheduler;
pub(crate) mod sha256;
pub(crate) mod slots;
pub(crate) mod training_trigger;
pub(crate) mod transfer;
pub(crate) mod work;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ringrift::config_key::ConfigKey;
use ringrift::events::Event;
use ringrift::protocol::{JOB_STUCK_AFTER_ENV, ROOT_ENV};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::runtime::{Ctx, JobOutcome, Settings};

/// The variable that gives a job of the shared work queue its item's id.
pub(crate) const WORK_ITEM_ENV: &str = "RINGRIFT_WORK_ITEM";

/// The loop's shared facts, built from a daemon's settings.
#[derive(Debug, Clone)]
pub(crate) struct Pipeline {
    pub root: PathBuf,
    pub config_keys: Vec<String>,
    /// kind → (command template, max runtime)
    pub jobs: BTreeMap<String, (Vec<String>, Duration)>,
    /// kind → its own `stuck_after` in seconds (0: never), for the kinds that set one.
    pub stuck_after: BTreeMap<String, f64>,
    /// This worker binary, for `{worker}`.
    pub worker: PathBuf,
    /// The node is in a cluster: the work queue is the cluster's shared one (through the
    /// supervisor), not data/work_queue.db.
    pub shared_queue: bool,
    /// `pipeline.ssh`: the ssh program and options for `host:path` copies.
    pub ssh: Vec<String>,
    /// `pipeline.capacity`: what this node runs at once.
    pub capacity: Capacity,
}

/// The node's capacity for the loop (`pipeline.capacity`; see `ringrift::config::Capacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub selfplay_slots: usize,
    pub training_slots: usize,
    pub evaluation_slots: usize,
    /// None: detect ([`detect_gpus`]).
    pub gpus: Option<u64>,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            selfplay_slots: 1,
            training_slots: 1,
            evaluation_slots: 1,
            gpus: None,
        }
    }
}

impl Capacity {
    /// From the `capacity` object of the pipeline section (absent keys: defaults).
    fn from_json(v: Option<&Value>) -> Capacity {
        let d = Capacity::default();
        let n = |k: &str, default: usize| {
            v.and_then(|c| c.get(k))
                .and_then(Value::as_u64)
                .map_or(default, |n| usize::try_from(n).unwrap_or(usize::MAX).max(1))
        };
        Capacity {
            selfplay_slots: n("selfplay_slots", d.selfplay_slots),
            training_slots: n("training_slots", d.training_slots),
            evaluation_slots: n("evaluation_slots", d.evaluation_slots),
            gpus: v.and_then(|c| c.get("gpus")).and_then(Value::as_u64),
        }
    }

    /// The GPUs to hand out: as configured, else detected on this node (run once per call).
    pub(crate) fn resolve_gpus(&self) -> u64 {
        self.gpus.unwrap_or_else(detect_gpus)
    }
}

/// The GPUs `nvidia-smi -L` lists (lines `GPU <n>: ...`), or 0 where it is missing or fails.
pub(crate) fn detect_gpus() -> u64 {
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| count_gpus(&String::from_utf8_lossy(&o.stdout)))
}

/// The GPUs in `nvidia-smi -L` output.
pub(crate) fn count_gpus(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.trim_start().starts_with("GPU "))
        .count() as u64
}

/// The GPU of a job in slot `slot` of a daemon whose slots come after `offset` others (training
/// slots first, then evaluation's), on a node with `gpus` GPUs: slots take the GPUs in turn, so
/// with as many GPUs as slots every job has one of its own. None without GPUs.
pub(crate) fn gpu_for_slot(offset: usize, slot: usize, gpus: u64) -> Option<u64> {
    (gpus > 0).then(|| (offset + slot) as u64 % gpus)
}

impl Pipeline {
    pub(crate) fn from_settings(settings: &Settings) -> anyhow::Result<Pipeline> {
        let root = std::env::var_os(ROOT_ENV)
            .map(PathBuf::from)
            .context("RINGRIFT_ROOT is not set")?;
        let p = settings
            .config
            .get("pipeline")
            .context("the configuration has no pipeline section")?;
        let config_keys: Vec<String> = p
            .get("config_keys")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if config_keys.is_empty() {
            bail!("pipeline.config_keys is empty");
        }
        for key in &config_keys {
            key.parse::<ConfigKey>().context("pipeline.config_keys")?;
        }
        let mut jobs = BTreeMap::new();
        let mut stuck_after = BTreeMap::new();
        if let Some(map) = p.get("jobs").and_then(Value::as_object) {
            for (kind, spec) in map {
                let command: Vec<String> = spec
                    .get("command")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|w| w.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let max = spec
                    .get("max_runtime")
                    .and_then(Value::as_f64)
                    .unwrap_or(3600.0);
                if let Some(secs) = spec.get("stuck_after").and_then(Value::as_f64) {
                    stuck_after.insert(kind.clone(), secs);
                }
                jobs.insert(kind.clone(), (command, Duration::from_secs_f64(max)));
            }
        }
        let worker = std::env::current_exe().context("cannot find the worker binary")?;
        let shared_queue = settings
            .config
            .get(ringrift::config::SHARED_WORK_QUEUE)
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let ssh = p
            .get("ssh")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .filter(|words| !words.is_empty())
            .unwrap_or_else(|| {
                ringrift::config::DEFAULT_SSH
                    .iter()
                    .map(|w| w.to_string())
                    .collect()
            });
        Ok(Pipeline {
            root,
            config_keys,
            jobs,
            stuck_after,
            worker,
            shared_queue,
            ssh,
            capacity: Capacity::from_json(p.get("capacity")),
        })
    }

    /// A pipeline at `root` with `config_keys` and no job templates, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(root: &Path, config_keys: Vec<String>) -> Pipeline {
        Pipeline {
            root: root.to_path_buf(),
            config_keys,
            jobs: BTreeMap::new(),
            stuck_after: BTreeMap::new(),
            worker: PathBuf::from("ringrift-worker"),
            shared_queue: false,
            ssh: vec!["ssh".into()],
            capacity: Capacity::default(),
        }
    }

    /// Where selfplay writes games DBs: NEW_GAMES_AVAILABLE.db_path must be in it.
    pub(crate) fn games_dir(&self) -> PathBuf {
        self.root.join("data/games")
    }
    pub(crate) fn games_db(&self, key: &str) -> PathBuf {
        self.games_dir().join(format!("{key}.db"))
    }
    /// Where exports are written: NPZ_EXPORT_COMPLETE.npz_path must be in it.
    pub(crate) fn training_dir(&self) -> PathBuf {
        self.root.join("data/training")
    }
    /// Where the canonical models are: MODEL_PROMOTED.model_path must be in it.
    pub(crate) fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }
    pub(crate) fn work_queue(&self) -> PathBuf {
        self.root.join("data/work_queue.db")
    }
    pub(crate) fn npz(&self, key: &str) -> PathBuf {
        self.training_dir().join(format!("{key}.npz"))
    }
    pub(crate) fn candidates_dir(&self, key: &str) -> PathBuf {
        self.root.join("models/candidates").join(key)
    }
    pub(crate) fn canonical(&self, key: &str) -> PathBuf {
        self.root
            .join("models")
            .join(format!("canonical_{key}.bin"))
    }
    pub(crate) fn best_link(&self, key: &str) -> PathBuf {
        self.root
            .join("models")
            .join(format!("ringrift_best_{key}"))
    }
    /// Pinned past generations of `key`, the gauntlet's fixed reference opponents
    /// (`gen-<N>.bin`, copied there by auto_promotion).
    pub(crate) fn reference_dir(&self, key: &str) -> PathBuf {
        self.root.join("models/reference").join(key)
    }
    pub(crate) fn backup_dir(&self) -> PathBuf {
        self.root.join("models/backup")
    }
    pub(crate) fn state_path(&self, daemon: &str) -> PathBuf {
        self.root
            .join("data/coordination")
            .join(format!("{daemon}.json"))
    }

    /// Fills a job template. `{worker} {root} {config_key} {board_type} {num_players} {db_path}
    /// {npz_path} {model_path}` come from the key; the caller gives the rest (`games`,
    /// `candidate_path`, `output_path`, `epochs`, `learning_rate`, `seed`, and for the
    /// gauntlet `sprt`: `ELO0,ELO1,ALPHA,BETA` or `off`; evaluation also names the baseline as
    /// `model_path`).
    pub(crate) fn job_command(
        &self,
        kind: &str,
        key: &str,
        vars: &[(&str, String)],
    ) -> anyhow::Result<(Vec<String>, Duration)> {
        let (template, max) = self
            .jobs
            .get(kind)
            .with_context(|| format!("no {kind} job in pipeline.jobs"))?;
        let parsed: ConfigKey = key.parse()?;
        let mut all: BTreeMap<&str, String> = BTreeMap::from([
            ("worker", self.worker.display().to_string()),
            ("root", self.root.display().to_string()),
            ("config_key", key.to_string()),
            ("board_type", parsed.board().to_string()),
            ("num_players", parsed.players().to_string()),
            ("db_path", self.games_db(key).display().to_string()),
            ("npz_path", self.npz(key).display().to_string()),
            ("model_path", self.canonical(key).display().to_string()),
        ]);
        for (k, v) in vars {
            all.insert(k, v.clone());
        }
        let mut out = Vec::with_capacity(template.len());
        for word in template {
            let w = ringrift::template::expand(word, |p| all.get(p).cloned())
                .map_err(|e| anyhow::anyhow!("the {kind} job template: {e}"))?;
            out.push(w);
        }
        Ok((out, *max))
    }

    /// The fingerprint of the `kind` job's template (command and max runtime, see
    /// [`ringrift::config::job_fingerprint`]); empty when there is no such job. Kept with a
    /// step's failure state: a failure of another command does not hold back this one.
    pub(crate) fn job_fingerprint(&self, kind: &str) -> String {
        self.jobs
            .get(kind)
            .map(|(cmd, max)| ringrift::config::job_fingerprint(cmd, max.as_secs_f64()))
            .unwrap_or_default()
    }

    /// Runs the `validate` job (`pipeline.jobs.validate`, a check of a model in a format of the
    /// user's own) on the model at `path` for `key`: [`Validation::NotConfigured`] when there
    /// is none, else what its exit says (0: valid; any other exit: invalid).
    pub(crate) async fn validate_model(&self, ctx: &Ctx, path: &Path, key: &str) -> Validation {
        if !self.jobs.contains_key("validate") {
            return Validation::NotConfigured;
        }
        let vars = [("candidate_path", path.display().to_string())];
        match self.run_job(ctx, "validate", key, &vars).await {
            Err(e) => Validation::NotRun(format!("cannot start the validate job: {e:#}")),
            Ok(o) if o.success => Validation::Valid,
            Ok(o) if o.timed_out || o.job_id.is_empty() => {
                Validation::NotRun(job_failure("validate", &o))
            }
            Ok(o) => {
                let line = selfplay_scheduler::last_error_line(&self.root, &o.job_id)
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default();
                Validation::Invalid(format!(
                    "the validate job {} says {} is not a valid model ({}; see logs/jobs/{}.log){line}",
                    o.job_id,
                    path.display(),
                    o.exit,
                    o.job_id
                ))
            }
        }
    }

    /// True when models come from the built-in trainer (`{worker} job train`), so the built-in
    /// loader can check them. A trainer of the user's own writes its own format: then a model is
    /// only checked to exist and not be empty.
    pub(crate) fn builtin_models(&self) -> bool {
        self.jobs.get("train").is_some_and(|(cmd, _)| {
            cmd.len() >= 3 && cmd[0] == "{worker}" && cmd[1] == "job" && cmd[2] == "train"
        })
    }

    /// Checks that a model file is usable for `key` (see [`Pipeline::builtin_models`]).
    pub(crate) fn check_model(&self, path: &Path, key: &str) -> anyhow::Result<()> {
        if self.builtin_models() {
            return training_trigger::check_model(path, key);
        }
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        anyhow::ensure!(len > 0, "{} is empty", path.display());
        Ok(())
    }

    /// The `config_key` of an event when it is one of this pipeline's keys. Any other key (or none)
    /// is logged as ignored by `daemon` and gives `None`.
    pub(crate) fn event_config_key(&self, daemon: &str, event: &Event) -> Option<String> {
        let key = event
            .payload
            .get("config_key")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !self.config_keys.contains(&key) {
            println!(
                "{daemon}: ignoring {} for {key:?}: not in pipeline.config_keys",
                event.event_type
            );
            return None;
        }
        Some(key)
    }

    /// Checks the file an event names in `field`, if it names one: `Err(why)` (naming the event,
    /// the path and what is wrong with it) unless it is a regular file inside `dir`. For daemons
    /// that work on their own files and take only the key from the event: an event that names
    /// a file elsewhere is not one of the pipeline's, and is not acted on.
    pub(crate) fn check_event_path(
        event: &Event,
        field: &str,
        dir: &Path,
    ) -> Result<(), RefusedPath> {
        match event.payload.get(field).and_then(Value::as_str) {
            None => Ok(()),
            Some(named) => confine::confined_file(dir, Path::new(named))
                .map(drop)
                .map_err(|why| RefusedPath {
                    event_type: event.event_type.clone(),
                    field: field.to_string(),
                    why,
                }),
        }
    }

    /// Runs a job of `kind` for `key` through the supervisor and waits for it.
    pub(crate) async fn run_job(
        &self,
        ctx: &Ctx,
        kind: &str,
        key: &str,
        vars: &[(&str, String)],
    ) -> anyhow::Result<JobOutcome> {
        self.run_job_for(ctx, kind, key, vars, None).await
    }

    /// As [`Pipeline::run_job`], for a job that runs the shared work queue's item `item` (its id
    /// is in the job's environment as `RINGRIFT_WORK_ITEM`).
    pub(crate) async fn run_job_for(
        &self,
        ctx: &Ctx,
        kind: &str,
        key: &str,
        vars: &[(&str, String)],
        item: Option<i64>,
    ) -> anyhow::Result<JobOutcome> {
        self.run_job_env(ctx, kind, key, vars, item, BTreeMap::new())
            .await
    }

    /// As [`Pipeline::run_job_for`], with `extra` in the job's environment (e.g.
    /// `CUDA_VISIBLE_DEVICES` of its slot's GPU).
    pub(crate) async fn run_job_env(
        &self,
        ctx: &Ctx,
        kind: &str,
        key: &str,
        vars: &[(&str, String)],
        item: Option<i64>,
        extra: BTreeMap<String, String>,
    ) -> anyhow::Result<JobOutcome> {
        let (command, max) = self.job_command(kind, key, vars)?;
        // The directory of the file the job must write exists before it runs (data/training/
        // on a fresh root, a candidate's directory): the job never has to create one.
        if let Some(var) = output_placeholder(kind) {
            let written = vars
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| PathBuf::from(v))
                .or_else(|| match var {
                    "db_path" => Some(self.games_db(key)),
                    "npz_path" => Some(self.npz(key)),
                    _ => None,
                });
            if let Some(dir) = written.as_deref().and_then(Path::parent) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
        }
        println!("{kind} job for {key}: {}", command.join(" "));
        // The job may name its item (in its own records, or to a script wrapping it).
        let mut env: BTreeMap<String, String> = item
            .map(|id| (WORK_ITEM_ENV.to_string(), id.to_string()))
            .into_iter()
            .collect();
        if let Some(secs) = self.stuck_after.get(kind) {
            env.insert(JOB_STUCK_AFTER_ENV.to_string(), secs.to_string());
        }
        env.extend(extra);
        Ok(ctx.run_job_for(command, max, env, item).await)
    }
}

/// The placeholder naming the file a job of `kind` must write (the README's plug-in contract):
/// its directory is created before the job runs.
pub(crate) fn output_placeholder(kind: &str) -> Option<&'static str> {
    match kind {
        "selfplay" => Some("db_path"),
        "export" => Some("npz_path"),
        "train" => Some("candidate_path"),
        "gauntlet" => Some("output_path"),
        _ => None,
    }
}

/// What the `validate` job said about a model (see [`Pipeline::validate_model`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Validation {
    /// No `validate` job is configured.
    NotConfigured,
    /// It exited 0.
    Valid,
    /// It exited otherwise: the model is not valid (why, for health and events).
    Invalid(String),
    /// It could not say: not started, or stopped at its max_runtime (why).
    NotRun(String),
}

/// An event whose `field` names a file the step does not act on (see
/// [`Pipeline::check_event_path`]).
#[derive(Debug, thiserror::Error)]
#[error("refused {event_type}: {field}: {why}")]
pub(crate) struct RefusedPath {
    pub event_type: String,
    pub field: String,
    pub why: confine::ConfinementError,
}

/// Why a `kind` job did not succeed, for health and logs:
/// `<kind> job <id> failed|overran its max_runtime (<exit>; see logs/jobs/<id>.log)`.
pub(crate) fn job_failure(kind: &str, outcome: &JobOutcome) -> String {
    let why = if outcome.timed_out {
        "overran its max_runtime"
    } else {
        "failed"
    };
    format!(
        "{kind} job {} {why} ({}; see logs/jobs/{}.log)",
        outcome.job_id, outcome.exit, outcome.job_id
    )
}

/// A daemon's persistent state: JSON in data/coordination/<daemon>.json, written atomically.
/// A missing or unreadable file gives the default (and says so on stderr when unreadable).
pub(crate) fn load_state<T: DeserializeOwned + Default>(path: &Path) -> T {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            eprintln!(
                "{}: unreadable state ({e}); starting afresh",
                path.display()
            );
            T::default()
        }),
        Err(_) => T::default(),
    }
}

pub(crate) fn save_state<T: Serialize>(path: &Path, state: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Saves `daemon`'s state to its file under data/coordination (see [`save_state`]).
pub(crate) fn save_daemon_state<T: Serialize>(
    pipeline: &Pipeline,
    daemon: &str,
    state: &T,
) -> Result<(), StateNotSaved> {
    let path = pipeline.state_path(daemon);
    save_state(&path, state).map_err(|cause| StateNotSaved { path, cause })
}

/// A daemon's state file that could not be written: `cannot write state <path>: <cause>`.
#[derive(Debug, thiserror::Error)]
#[error("cannot write state {}: {cause:#}", path.display())]
pub(crate) struct StateNotSaved {
    pub path: PathBuf,
    pub cause: anyhow::Error,
}

/// Saves `daemon`'s state (see [`save_daemon_state`]); a failure is logged on stderr as
/// `<daemon>: cannot write state ...` and kept in `last_error` for health.
pub(crate) fn save_or_note<T: Serialize>(
    pipeline: &Pipeline,
    daemon: &str,
    state: &T,
    last_error: &mut Option<String>,
) {
    if let Err(e) = save_daemon_state(pipeline, daemon, state) {
        eprintln!("{daemon}: {e}");
        *last_error = Some(e.to_string());
    }
}

/// Emits an event through `ctx` when there is one (a daemon built by a unit test has none).
pub(crate) fn emit(ctx: Option<&Ctx>, event_type: &str, payload: Value) {
    if let Some(ctx) = ctx {
        ctx.emit(event_type, payload);
    }
}

/// Logs a problem on stderr as `<daemon>: <message>` and keeps it, stamped with the time, as the
/// daemon's last error for health: `<RFC 3339 time> <message>`.
pub(crate) fn note_error(last_error: &mut Option<String>, daemon: &str, message: &str) {
    eprintln!("{daemon}: {message}");
    *last_error = Some(format!("{} {message}", ringrift::timefmt::now_rfc3339()));
}

/// The last word about one config key, for health.
#[derive(Debug, Clone)]
pub(crate) struct KeyStatus {
    pub(crate) ok: bool,
    pub(crate) message: String,
}

/// Which of a key's messages [`KeyHealth::set`] logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyLog {
    /// Every failure, on stderr; successes not at all.
    Failures,
    /// Every change of a key's message: successes on stdout, failures on stderr.
    Changes,
}

/// The health of a daemon that works key by key: the last word about each config key, and the
/// last error with its time.
#[derive(Debug, Default)]
pub(crate) struct KeyHealth {
    pub(crate) status: BTreeMap<String, KeyStatus>,
    pub(crate) last_error: Option<String>,
}

impl KeyHealth {
    /// True while no key's last word is a failure.
    pub(crate) fn healthy(&self) -> bool {
        self.status.values().all(|s| s.ok)
    }

    /// The health message: `key: message` for every key, joined with "; ", or `none_yet` while
    /// there are none.
    pub(crate) fn message(&self, none_yet: &str) -> String {
        if self.status.is_empty() {
            none_yet.to_string()
        } else {
            self.status
                .iter()
                .map(|(k, s)| format!("{k}: {}", s.message))
                .collect::<Vec<_>>()
                .join("; ")
        }
    }

    /// Records the last word about `key`, logged as `<daemon>: <key>: <message>` as `log` says;
    /// a failure also becomes the last error (`<time> <key>: <message>`).
    pub(crate) fn set(&mut self, daemon: &str, key: &str, ok: bool, message: String, log: KeyLog) {
        let line = format!("{key}: {message}");
        match log {
            KeyLog::Failures if !ok => note_error(&mut self.last_error, daemon, &line),
            KeyLog::Failures => {}
            KeyLog::Changes => {
                let changed = self.status.get(key).is_none_or(|s| s.message != message);
                if changed && ok {
                    println!("{daemon}: {line}");
                } else if !ok {
                    if changed {
                        eprintln!("{daemon}: {line}");
                    }
                    self.last_error = Some(format!("{} {line}", ringrift::timefmt::now_rfc3339()));
                }
            }
        }
        self.status
            .insert(key.to_string(), KeyStatus { ok, message });
    }
}

/// This daemon's typed settings (one struct per daemon in `ringrift::settings`, the types
/// `config check` validated), or an error naming every bad key. Never a silent default.
pub(crate) fn typed<T>(
    settings: &Settings,
    read: fn(&serde_json::Map<String, Value>) -> Result<T, ringrift::settings::SettingsError>,
) -> anyhow::Result<T> {
    let empty = serde_json::Map::new();
    let map = settings.config.as_object().unwrap_or(&empty);
    read(map).map_err(anyhow::Error::from)
}

/// Runs futures concurrently on this thread (the worker's futures need not be `Send`), returning
/// their outputs in order.
pub(crate) use futures_util::future::join_all;

/// Health of a daemon that works in passes over configured destinations: idle (and healthy) with
/// nothing configured, "no pass yet" before the first pass, else the last pass's summary.
pub(crate) fn pass_health(
    configured: bool,
    idle_message: &str,
    last: &str,
    ok: bool,
) -> (bool, &'static str, String) {
    if !configured {
        (true, "idle", idle_message.to_string())
    } else if last.is_empty() {
        (true, "ok", "no pass yet".to_string())
    } else {
        (ok, if ok { "ok" } else { "degraded" }, last.to_string())
    }
}

/// Keys with a job of one kind running now, counted (a key may have several at once): for the
/// stage a daemon reports in its per-key view ([`view_details`]).
#[derive(Debug, Default)]
pub(crate) struct Busy(BTreeMap<String, usize>);

impl Busy {
    /// A job of `key` starts. True when `key` was not busy before (the view changed).
    pub(crate) fn start(&mut self, key: &str) -> bool {
        let n = self.0.entry(key.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// A job of `key` ended. True when `key` is no longer busy (the view changed).
    pub(crate) fn end(&mut self, key: &str) -> bool {
        match self.0.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.0.remove(key);
                true
            }
            None => false,
        }
    }

    /// The busy keys.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// Adds a daemon's per-key facts to its health details, under the field the supervisor merges
/// into `status`'s per-key view (`details.pipeline`, see [`ringrift::pipeline_view`]).
pub(crate) fn view_details(
    details: &mut BTreeMap<String, Value>,
    reports: BTreeMap<String, ringrift::pipeline_view::KeyReport>,
) {
    details.insert(
        ringrift::pipeline_view::DETAILS_FIELD.to_string(),
        ringrift::pipeline_view::details_value(&reports),
    );
}

/// The per-key reports of a daemon whose only fact is `stage` while the keys in `busy` have a job
/// running.
pub(crate) fn stage_reports(
    busy: impl IntoIterator<Item = impl Into<String>>,
    stage: ringrift::pipeline_view::Stage,
) -> BTreeMap<String, ringrift::pipeline_view::KeyReport> {
    busy.into_iter()
        .map(|k| {
            (
                k.into(),
                ringrift::pipeline_view::KeyReport {
                    stages: vec![stage],
                    ..Default::default()
                },
            )
        })
        .collect()
}

/// Seconds since the unix epoch.
pub(crate) fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn gpus_are_counted_and_handed_to_slots_in_turn() {
        let listing = "GPU 0: NVIDIA A100 (UUID: GPU-1)\nGPU 1: NVIDIA A100 (UUID: GPU-2)\n";
        assert_eq!(count_gpus(listing), 2);
        assert_eq!(count_gpus(""), 0);
        assert_eq!(gpu_for_slot(0, 0, 0), None);
        assert_eq!(gpu_for_slot(0, 1, 2), Some(1));
        // Evaluation's slots come after training's: 1 training slot, 2 GPUs → evaluation on GPU 1.
        assert_eq!(gpu_for_slot(1, 0, 2), Some(1));
        assert_eq!(gpu_for_slot(1, 1, 2), Some(0));
    }

    #[test]
    fn capacity_is_read_from_the_pipeline_section() {
        let c = Capacity::from_json(Some(&serde_json::json!({
            "selfplay_slots": 4, "training_slots": 2, "evaluation_slots": 3, "gpus": null
        })));
        assert_eq!(
            (
                c.selfplay_slots,
                c.training_slots,
                c.evaluation_slots,
                c.gpus
            ),
            (4, 2, 3, None)
        );
        assert_eq!(Capacity::from_json(None), Capacity::default());
    }

    /// Runs `f` to the end on a fresh single-threaded runtime.
    pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn pipeline() -> Pipeline {
        let defaults = ringrift::config::PipelineConfig::default().to_json();
        let settings =
            Settings::from_config(Some(&serde_json::json!({ "pipeline": defaults }))).unwrap();
        // SAFETY: single-threaded test setup of a variable no other test reads concurrently.
        unsafe { std::env::set_var(ROOT_ENV, "/srv/rr") };
        Pipeline::from_settings(&settings).unwrap()
    }

    #[test]
    fn busy_keys_are_counted_and_changes_of_the_set_are_told() {
        let mut busy = Busy::default();
        assert!(busy.start("a"));
        assert!(!busy.start("a"));
        assert!(busy.start("b"));
        assert!(!busy.end("a"));
        assert_eq!(busy.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(busy.end("a"));
        assert!(!busy.end("a"), "not busy: nothing changes");
        assert_eq!(busy.keys().collect::<Vec<_>>(), ["b"]);
        let mut details = BTreeMap::new();
        view_details(
            &mut details,
            stage_reports(
                busy.keys().cloned(),
                ringrift::pipeline_view::Stage::Training,
            ),
        );
        assert_eq!(
            details["pipeline"],
            serde_json::json!({"b": {"stages": ["training"]}})
        );
    }

    #[test]
    fn templates_are_filled_from_the_key_and_the_caller() {
        let p = pipeline();
        let (cmd, max) = p
            .job_command(
                "selfplay",
                "hex8_2p",
                &[("games", "50".into()), ("seed", "7".into())],
            )
            .unwrap();
        assert_eq!(cmd[1..3], ["job".to_string(), "selfplay".to_string()]);
        assert!(
            cmd.contains(&"/srv/rr/data/games/hex8_2p.db".to_string()),
            "{cmd:?}"
        );
        assert!(
            cmd.contains(&"/srv/rr/models/canonical_hex8_2p.bin".to_string()),
            "{cmd:?}"
        );
        assert!(cmd.contains(&"50".to_string()) && cmd.contains(&"7".to_string()));
        assert_eq!(max, Duration::from_secs(1800));
        let err = p
            .job_command("selfplay", "hex8_2p", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("{games}"), "{err}");
    }
}
