//! AUTO_EXPORT: turns newly completed selfplay games into the training file `data/training/<key>.npz`.
//!
//! Why it is shaped this way:
//! - The games DB is the truth, not the NEW_GAMES_AVAILABLE events: the event only makes the check
//!   happen sooner. Every cycle counts completed games above the last exported id, so a lost event
//!   (or a worker killed mid-export) delays an export by at most one interval and never loses one.
//! - Exporting is batched: it waits for `threshold_games` new games, or for `batch_timeout` seconds
//!   after the first new game arrived, so a trickle of games still gets trained on eventually. The
//!   moment the batch started is kept in the state file, so a restart does not reset the timeout.
//! - The export runs as a supervisor job (the `pipeline.jobs.export` template) and its output is
//!   decoded before anyone is told about it; an unusable file is renamed to `<npz>.bad` so training
//!   never sees it. Game rows the job skipped (they break the schema's meaning) are counted in
//!   NPZ_EXPORT_COMPLETE's `skipped_rows` and in health, from the job's `<npz>.summary.json`.
//! - A failed attempt is retried on the capped, jittered backoff of [`super::retry`] (2 s doubling
//!   to 5 min), by the scan and by events alike; the schedule is in the state file, so
//!   training_trigger can say why no new export comes. The NPZ events have no failure type, so a
//!   failure shows in health (`retrying in N s after: <error>`) and the log.
//! - A games DB that cannot be counted, or an export job that fails, gets the DB checked; a damaged
//!   one is moved aside ([`super::games_db`], GAMES_DB_QUARANTINED) and the key starts over.
//! - The DB is opened read-only with a busy timeout: selfplay keeps writing while we count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::jobs::game::npz::Dataset;
use anyhow::Context;
use ringrift::events::{Event, payload};
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::games_db::{DbUnusable, Depth, Quarantined, ensure_usable};
use super::retry::Failing;
use super::selfplay_scheduler::{keep_quarantined, last_error_line};
use super::{
    KeyHealth, KeyLog, KeyStatus, Pipeline, job_failure, load_state, note_error, now_secs,
    save_or_note, typed, view_details,
};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::pipeline_view::{KeyReport, Stage};
use ringrift::settings::ExportSettings;

const NAME: &str = "auto_export";
/// How long a count waits for selfplay's write lock.
const DB_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(AutoExport::default())
}

/// Per config key, kept across restarts in data/coordination/auto_export.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct KeyState {
    /// The highest game id in the last successful export (0: never exported).
    last_game_id: i64,
    /// Unix time at which new games were first seen below the threshold.
    pending_since: Option<f64>,
    last_export_at: Option<f64>,
    last_samples: u64,
    /// Game rows the last export left out (see `skipped_rows` in NPZ_EXPORT_COMPLETE).
    #[serde(default)]
    last_skipped_rows: u64,
    /// Set while exporting keeps failing: the retry schedule (training_trigger reads it too).
    #[serde(default)]
    failing: Option<Failing>,
    /// The fingerprint of the export job template that failed ([`Pipeline::job_fingerprint`]):
    /// a failing schedule of another command is dropped when the worker starts.
    #[serde(default)]
    failing_job: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    keys: BTreeMap<String, KeyState>,
}

/// What to do about one key, given what the DB says.
#[derive(Debug, Clone, PartialEq)]
enum Decision {
    /// Nothing new.
    Nothing,
    /// New games, not enough yet: export at the latest when `remaining` seconds have passed.
    Wait {
        pending_since: f64,
        remaining: f64,
    },
    Export {
        reason: String,
    },
}

/// The export rule, without a DB or a clock.
fn decide(
    new_games: u64,
    threshold: u64,
    pending_since: Option<f64>,
    batch_timeout: f64,
    now: f64,
    npz_missing_after_export: bool,
) -> Decision {
    if npz_missing_after_export {
        return Decision::Export {
            reason: "the export file is missing (quarantined or deleted): exporting again".into(),
        };
    }
    if new_games == 0 {
        return Decision::Nothing;
    }
    if new_games >= threshold {
        return Decision::Export {
            reason: format!("{new_games} new games reached the threshold of {threshold}"),
        };
    }
    let since = pending_since.unwrap_or(now);
    let waited = (now - since).max(0.0);
    if waited >= batch_timeout {
        Decision::Export {
            reason: format!(
                "{new_games} new games (threshold {threshold}) waited {waited:.0}s ≥ batch_timeout {batch_timeout}s"
            ),
        }
    } else {
        Decision::Wait {
            pending_since: since,
            remaining: batch_timeout - waited,
        }
    }
}

/// What the games DB says about a key: completed games above `after`, the highest of their ids,
/// the highest completed id overall (to notice a DB that was replaced and restarted its ids), and
/// how many completed games there are in all (for the per-key view).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DbCount {
    new_games: u64,
    max_new_id: Option<i64>,
    max_id: Option<i64>,
    total: u64,
}

/// `Ok(None)`: the DB does not exist yet.
fn count_new_games(db: &Path, key: &str, after: i64) -> anyhow::Result<Option<DbCount>> {
    if !db.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open games db {}", db.display()))?;
    conn.busy_timeout(DB_BUSY_TIMEOUT)?;
    let (new_games, max_new_id): (i64, Option<i64>) = conn
        .query_row(
            "SELECT COUNT(*), MAX(id) FROM games WHERE config_key = ?1 AND status = 'completed' AND id > ?2",
            params![key, after],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .with_context(|| format!("games db {} is not readable", db.display()))?;
    // One pass over the index (config_key, status, id) counts them all.
    let (total, max_id): (i64, Option<i64>) = conn
        .query_row(
            "SELECT COUNT(*), MAX(id) FROM games WHERE config_key = ?1 AND status = 'completed'",
            params![key],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .with_context(|| format!("games db {} is not readable", db.display()))?;
    Ok(Some(DbCount {
        new_games: new_games.max(0) as u64,
        max_new_id,
        max_id,
        total: total.max(0) as u64,
    }))
}

/// What a finished export holds.
#[derive(Debug, Clone, PartialEq)]
struct ExportSummary {
    samples: u64,
    games: u64,
    last_game_id: Option<i64>,
}

/// Reads and decodes the export at `path`, checking that it holds `key`'s samples.
pub(crate) fn read_export(path: &Path, key: &str) -> anyhow::Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let data = Dataset::decode(&bytes)
        .with_context(|| format!("{} is not a valid NPZ", path.display()))?;
    anyhow::ensure!(
        data.config_key == key,
        "{} holds {} samples, not {key}",
        path.display(),
        data.config_key
    );
    Ok(data)
}

/// Decodes an export and checks it is usable for `key`.
fn validate_npz(path: &Path, key: &str) -> anyhow::Result<ExportSummary> {
    let data = read_export(path, key)?;
    anyhow::ensure!(!data.is_empty(), "{} has no samples", path.display());
    let mut ids = data.game_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    Ok(ExportSummary {
        samples: data.len() as u64,
        games: ids.len() as u64,
        last_game_id: ids.last().copied(),
    })
}

/// Why exporting `key` keeps failing, from auto_export's state file, if it does: for
/// training_trigger, which must not call a key "up to date" while no new export can come.
pub(crate) fn export_failing(pipeline: &Pipeline, key: &str) -> Option<Failing> {
    let state: State = load_state(&pipeline.state_path(NAME));
    state.keys.get(key).and_then(|k| k.failing.clone())
}

/// What the built-in export job says beside its output (`<output>.summary.json`): the game rows
/// it skipped and the highest id it read. `None` from an exporter that writes no such file.
fn job_summary(staging: &Path) -> Option<(u64, Option<i64>)> {
    let path = crate::jobs::export_summary_path(staging);
    let bytes = std::fs::read(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v.get("skipped_rows")?.as_u64()?,
        v.get("last_game_id").and_then(Value::as_i64),
    ))
}

/// Renames a bad file to `<file>.bad` (replacing an older one), so nothing reads it again.
pub(crate) fn quarantine(path: &Path) -> Option<PathBuf> {
    let mut bad = path.as_os_str().to_owned();
    bad.push(".bad");
    let bad = PathBuf::from(bad);
    match std::fs::rename(path, &bad) {
        Ok(()) => {
            eprintln!("quarantined {} as {}", path.display(), bad.display());
            Some(bad)
        }
        Err(e) => {
            eprintln!("cannot quarantine {}: {e}", path.display());
            None
        }
    }
}

#[derive(Default)]
struct AutoExport {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    threshold: u64,
    batch_timeout: f64,
    replay_window: u64,
    games_keep: u64,
    /// Games deleted from the games DBs by retention (`games_keep`) since start.
    games_pruned: u64,
    state: State,
    health: KeyHealth,
    scans: u64,
    exports: u64,
    failures: u64,
    games_exported: u64,
    samples_exported: u64,
    rows_skipped: u64,
    dbs_quarantined: u64,
    /// Games DBs this process moved aside, the latest last.
    quarantined: Vec<Quarantined>,
    /// Per key, from the last count: completed games in all, and not yet exported.
    counts: BTreeMap<String, (u64, u64)>,
    /// The key whose export job runs now.
    exporting: Option<String>,
}

impl AutoExport {
    fn report(&self) -> Report {
        let healthy = self.health.healthy();
        let idle = self.health.status.is_empty()
            || self
                .health
                .status
                .values()
                .all(|s| s.message.contains("no games yet"));
        let mut message = self.health.message("no scan yet");
        if let Some(q) = self.quarantined.last() {
            message = format!("{message}; {}", q.describe());
        }
        let keys: serde_json::Map<String, Value> = self
            .state
            .keys
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    json!({"last_game_id": s.last_game_id, "pending_since": s.pending_since,
                           "last_export_at": s.last_export_at, "last_samples": s.last_samples,
                           "last_skipped_rows": s.last_skipped_rows, "failing": s.failing}),
                )
            })
            .collect();
        let status = if !healthy {
            "degraded"
        } else if idle {
            "idle"
        } else {
            "ok"
        };
        let mut details = BTreeMap::from([
            ("keys".to_string(), Value::Object(keys)),
            ("threshold_games".to_string(), Value::from(self.threshold)),
            ("batch_timeout".to_string(), Value::from(self.batch_timeout)),
            ("replay_window".to_string(), Value::from(self.replay_window)),
            ("games_keep".to_string(), Value::from(self.games_keep)),
            ("last_error".to_string(), json!(self.health.last_error)),
            (
                "quarantined".to_string(),
                Value::Array(self.quarantined.iter().map(Quarantined::to_json).collect()),
            ),
        ]);
        view_details(&mut details, self.view());
        Report::with_status(
            healthy,
            status,
            message,
            details,
            [
                ("scans", self.scans),
                ("exports", self.exports),
                ("export_failures", self.failures),
                ("games_exported", self.games_exported),
                ("samples_exported", self.samples_exported),
                ("rows_skipped", self.rows_skipped),
                ("dbs_quarantined", self.dbs_quarantined),
                ("games_pruned", self.games_pruned),
            ],
        )
    }

    /// This daemon's facts for the per-key view: games (as of the last count), the last export,
    /// and stage `export` while a key's export job runs.
    fn view(&self) -> BTreeMap<String, KeyReport> {
        let keys = self.pipeline.iter().flat_map(|p| p.config_keys.iter());
        keys.map(|k| {
            let counts = self.counts.get(k);
            let report = KeyReport {
                games_total: counts.map(|c| c.0),
                games_since_export: counts.map(|c| c.1),
                last_export_at: self.state.keys.get(k).and_then(|s| s.last_export_at),
                stages: if self.exporting.as_deref() == Some(k.as_str()) {
                    vec![Stage::Export]
                } else {
                    Vec::new()
                },
                ..KeyReport::default()
            };
            (k.clone(), report)
        })
        .collect()
    }

    fn set(&mut self, key: &str, ok: bool, message: String) {
        self.health.set(NAME, key, ok, message, KeyLog::Failures);
    }

    fn save(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        save_or_note(pipeline, NAME, &self.state, &mut self.health.last_error);
    }

    /// A failed attempt for `key`: schedules the retry ([`Failing::after`]), keeps it in the
    /// state file and says in health when the next attempt is due and why.
    fn fail(&mut self, key: &str, error: String) {
        self.failures += 1;
        let now = now_secs();
        let mut ks = self.state.keys.get(key).cloned().unwrap_or_default();
        let failing = Failing::after(ks.failing.as_ref(), error, now, ringrift::restart::jitter());
        let message = failing.describe(now);
        ks.failing = Some(failing);
        ks.failing_job = Some(
            self.pipeline
                .as_ref()
                .expect("started")
                .job_fingerprint("export"),
        );
        self.state.keys.insert(key.to_string(), ks);
        self.save();
        self.set(key, false, message);
    }

    /// Checks `key`'s games DB (with `quick_check`: a use of it failed) and moves it aside if it
    /// is damaged ([`ensure_usable`]). On a
    /// quarantine the key starts over: the fresh DB's ids begin at 1 and no retry is pending.
    /// `Err(why)`: the DB cannot be checked or moved now.
    fn guard(&mut self, key: &str) -> Result<bool, DbUnusable> {
        let pipeline = self.pipeline.clone().expect("started");
        let ctx = self.ctx.clone().expect("attached");
        match ensure_usable(&pipeline, &ctx, NAME, key, Depth::Full)? {
            None => Ok(false),
            Some(q) => {
                self.dbs_quarantined += 1;
                keep_quarantined(&mut self.quarantined, vec![q]);
                let ks = self.state.keys.entry(key.to_string()).or_default();
                ks.last_game_id = 0;
                ks.pending_since = None;
                ks.failing = None;
                self.save();
                Ok(true)
            }
        }
    }

    /// Drops `key`'s retry schedule when the operator reset its backoff after it began
    /// (`pipeline reset-backoff KEY`), or when it is of another export command than the current
    /// one (changed since it failed).
    fn forget_failures(&mut self, pipeline: &Pipeline, key: &str) {
        let Some(ks) = self.state.keys.get_mut(key) else {
            return;
        };
        let Some(f) = &ks.failing else {
            return;
        };
        let why = if ringrift::backoff::reset_at(&pipeline.root, key)
            .is_some_and(|at| f.since <= at)
        {
            "reset by the operator"
        } else if ks.failing_job.as_deref() != Some(pipeline.job_fingerprint("export").as_str()) {
            "the export job changed since it failed"
        } else {
            return;
        };
        println!("{NAME}: {key}: retry schedule dropped: {why}");
        ks.failing = None;
        ks.failing_job = None;
        self.health.status.remove(key);
        self.save();
    }

    /// Looks at one key and exports when the rule says so. While exporting `key` keeps failing,
    /// nothing is tried before its retry time, whatever triggered the check.
    async fn check_key(&mut self, key: &str) {
        let pipeline = self.pipeline.clone().expect("started");
        self.forget_failures(&pipeline, key);
        let db = pipeline.games_db(key);
        if let Some(f) = self.state.keys.get(key).and_then(|k| k.failing.clone())
            && f.wait(now_secs()).is_some()
        {
            // Logged when the attempt failed; while waiting, only health follows the countdown.
            let message = f.describe(now_secs());
            self.health
                .status
                .insert(key.to_string(), KeyStatus { ok: false, message });
            return;
        }
        let mut ks = self.state.keys.get(key).cloned().unwrap_or_default();
        let mut counted = count_new_games(&db, key, ks.last_game_id);
        if let Err(e) = &counted {
            match self.guard(key) {
                Ok(true) => {
                    ks = self.state.keys.get(key).cloned().unwrap_or_default();
                    counted = count_new_games(&db, key, 0);
                }
                Ok(false) => {}
                Err(why) => counted = Err(anyhow::anyhow!("{e:#}; {why}")),
            }
        }
        if let Ok(Some(c)) = &counted
            && ks.last_game_id > 0
            && c.max_id.unwrap_or(0) < ks.last_game_id
        {
            println!(
                "{NAME}: {key}: the games db's highest id {} is below the last exported id {}: the DB was replaced; counting from 0",
                c.max_id.unwrap_or(0),
                ks.last_game_id
            );
            ks.last_game_id = 0;
            self.state.keys.insert(key.to_string(), ks.clone());
            self.save();
            counted = count_new_games(&db, key, 0);
        }
        let count = match counted {
            Ok(None) => {
                self.counts.insert(key.to_string(), (0, 0));
                self.set(
                    key,
                    true,
                    format!("no games yet ({} does not exist)", db.display()),
                );
                return;
            }
            Ok(Some(c)) => {
                self.counts.insert(key.to_string(), (c.total, c.new_games));
                c
            }
            Err(e) => {
                self.fail(key, format!("games db unreadable: {e:#}"));
                return;
            }
        };
        let now = now_secs();
        let npz = pipeline.npz(key);
        let missing = ks.last_game_id > 0 && !npz.exists();
        match decide(
            count.new_games,
            self.threshold,
            ks.pending_since,
            self.batch_timeout,
            now,
            missing,
        ) {
            Decision::Nothing => {
                if ks.pending_since.take().is_some() | ks.failing.take().is_some() {
                    self.state.keys.insert(key.to_string(), ks.clone());
                    self.save();
                }
                let last = match ks.last_export_at {
                    Some(_) => format!(
                        "up to date (last export: games up to id {}, {} samples{})",
                        ks.last_game_id,
                        ks.last_samples,
                        match ks.last_skipped_rows {
                            0 => String::new(),
                            n => format!("; skipped {n} game row(s) that break the schema"),
                        }
                    ),
                    None => "no completed games yet".to_string(),
                };
                self.set(key, true, last);
            }
            Decision::Wait {
                pending_since,
                remaining,
            } => {
                if ks.pending_since != Some(pending_since) {
                    ks.pending_since = Some(pending_since);
                    self.state.keys.insert(key.to_string(), ks);
                    self.save();
                }
                self.set(
                    key,
                    true,
                    format!(
                        "waiting: {} new games (threshold {}), exporting anyway in {remaining:.0}s",
                        count.new_games, self.threshold
                    ),
                );
            }
            Decision::Export { reason } => {
                println!("{NAME}: {key}: exporting: {reason}");
                self.export(&pipeline, key, ks, count).await;
            }
        }
    }

    async fn export(&mut self, pipeline: &Pipeline, key: &str, mut ks: KeyState, count: DbCount) {
        let ctx = self.ctx.clone().expect("attached");
        ctx.emit(
            "NPZ_EXPORT_STARTED",
            payload([
                ("config_key", key.into()),
                ("games", count.new_games.into()),
            ]),
        );
        let npz = pipeline.npz(key);
        // The job writes a staging file; it replaces the training file (which training_trigger
        // watches) only once validated, just before NPZ_EXPORT_COMPLETE.
        let staging = npz.with_extension("npz.partial");
        // A summary left by an earlier run must not be taken for this one's.
        let _ = std::fs::remove_file(crate::jobs::export_summary_path(&staging));
        // The export extends the previous one only while it belongs to this games DB (a
        // replaced DB starts over at id 1: then the key's last id was reset to 0).
        let previous = if ks.last_game_id > 0 && npz.is_file() {
            npz.display().to_string()
        } else {
            String::new()
        };
        // The per-key view shows the export while its job runs.
        self.exporting = Some(key.to_string());
        ctx.publish(self.report());
        let outcome = pipeline
            .run_job(
                &ctx,
                "export",
                key,
                &[
                    ("games", count.new_games.to_string()),
                    ("npz_path", staging.display().to_string()),
                    ("previous_npz_path", previous),
                    ("replay_window", self.replay_window.to_string()),
                ],
            )
            .await;
        self.exporting = None;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                self.fail(key, format!("cannot start the export job: {e:#}"));
                return;
            }
        };
        if !outcome.success {
            let mut error = job_failure("export", &outcome);
            if let Some(line) = last_error_line(&pipeline.root, &outcome.job_id) {
                error = format!("{error}: {line}");
            }
            // The job may have met a damaged DB: then it is moved aside and the key starts over.
            match self.guard(key) {
                Ok(true) => self.set(key, false, format!("{error}; the games db was quarantined")),
                Ok(false) => self.fail(key, error),
                Err(why) => self.fail(key, format!("{error}; {why}")),
            }
            return;
        }
        let job = job_summary(&staging);
        let summary = match validate_npz(&staging, key) {
            Ok(s) => s,
            Err(e) => {
                let moved = quarantine(&staging)
                    .map(|p| format!("; moved to {}", p.display()))
                    .unwrap_or_default();
                self.fail(
                    key,
                    format!("export produced an unusable file: {e:#}{moved}"),
                );
                return;
            }
        };
        if let Err(e) = std::fs::rename(&staging, &npz) {
            self.fail(
                key,
                format!("cannot move {} into place: {e}", staging.display()),
            );
            return;
        }
        let skipped_rows = job.map(|(n, _)| n);
        // Skipped games count as read (the job says how far it read), so they are not counted
        // as new again.
        let last_game_id = summary
            .last_game_id
            .max(job.and_then(|(_, last)| last))
            .or(count.max_new_id)
            .unwrap_or(ks.last_game_id)
            .max(ks.last_game_id);
        ks.last_game_id = last_game_id;
        ks.pending_since = None;
        ks.failing = None;
        ks.last_export_at = Some(now_secs());
        ks.last_samples = summary.samples;
        ks.last_skipped_rows = skipped_rows.unwrap_or(0);
        self.rows_skipped += skipped_rows.unwrap_or(0);
        self.state.keys.insert(key.to_string(), ks);
        self.save();
        let pruned = self.prune(pipeline, key, last_game_id);
        // What was counted is exported now (games that came meanwhile are counted next scan).
        self.counts
            .insert(key.to_string(), (count.total.saturating_sub(pruned), 0));
        self.exports += 1;
        self.games_exported += count.new_games;
        self.samples_exported += summary.samples;
        let skipped = match skipped_rows {
            Some(n) if n > 0 => format!(
                "; skipped {n} game row(s) that break the schema (see logs/jobs/{}.log)",
                outcome.job_id
            ),
            _ => String::new(),
        };
        self.set(
            key,
            true,
            format!(
                "exported at {}: {} games ({} new) → {} samples, games up to id {last_game_id}{skipped}",
                ringrift::timefmt::now_rfc3339(),
                summary.games,
                count.new_games,
                summary.samples
            ),
        );
        ctx.emit_now(
            "NPZ_EXPORT_COMPLETE",
            payload([
                ("config_key", key.into()),
                ("npz_path", npz.display().to_string().into()),
                ("samples", summary.samples.into()),
                ("games", summary.games.into()),
                ("last_game_id", last_game_id.into()),
                (
                    "skipped_rows",
                    skipped_rows.map_or(Value::Null, Value::from),
                ),
            ]),
        )
        .await;
    }

    /// Retention: deletes the games of `key` beyond its newest `games_keep` that the export
    /// just read (ids up to `exported`). A failure is noted and retried after the next export.
    fn prune(&mut self, pipeline: &Pipeline, key: &str, exported: i64) -> u64 {
        let db = pipeline.games_db(key);
        match crate::jobs::db::GamesDb::open_existing(&db)
            .and_then(|d| d.prune(key, self.games_keep, exported))
        {
            Ok(0) => 0,
            Ok(n) => {
                self.games_pruned += n;
                println!(
                    "{NAME}: {key}: deleted {n} exported game(s) beyond the newest {} (games_keep)",
                    self.games_keep
                );
                n
            }
            Err(e) => {
                note_error(
                    &mut self.health.last_error,
                    NAME,
                    &format!("{key}: cannot prune old games: {e:#}"),
                );
                0
            }
        }
    }

    async fn scan(&mut self) {
        self.scans += 1;
        let keys = self.pipeline.as_ref().expect("started").config_keys.clone();
        for key in keys {
            self.check_key(&key).await;
        }
    }
}

impl Daemon for AutoExport {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["NEW_GAMES_AVAILABLE".into(), "BACKOFF_RESET".into()]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, ExportSettings::from_map)?;
            self.threshold = s.threshold_games;
            self.batch_timeout = s.batch_timeout.as_secs_f64();
            self.replay_window = s.replay_window;
            self.games_keep = s.games_keep;
            self.state = load_state(&pipeline.state_path(NAME));
            println!(
                "{NAME}: watching {} (threshold {} games, batch timeout {}s); state: {:?}",
                pipeline.config_keys.join(", "),
                self.threshold,
                self.batch_timeout,
                self.state.keys
            );
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.scan().await;
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            let games_dir = self.pipeline.as_ref().expect("started").games_dir();
            let key = self.pipeline.as_ref()?.event_config_key(NAME, &event)?;
            // The export reads this pipeline's own games DB; an event naming a DB elsewhere is not
            // one of the pipeline's (there is no export failure event: logged and in health).
            if let Err(why) = Pipeline::check_event_path(&event, "db_path", &games_dir) {
                note_error(&mut self.health.last_error, NAME, &format!("{key}: {why}"));
                return Some(self.report());
            }
            self.check_key(&key).await;
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::jobs::game::GameConfig;
    use crate::jobs::game::{play_game, samples};
    use fastrand::Rng;

    use super::*;
    use crate::pipeline::save_state;

    #[test]
    fn threshold_exports_at_once_and_fewer_games_wait_for_the_batch_timeout() {
        assert_eq!(decide(0, 100, None, 5.0, 1000.0, false), Decision::Nothing);
        assert!(matches!(
            decide(100, 100, None, 5.0, 1000.0, false),
            Decision::Export { .. }
        ));
        assert_eq!(
            decide(10, 100, None, 5.0, 1000.0, false),
            Decision::Wait {
                pending_since: 1000.0,
                remaining: 5.0
            }
        );
        assert_eq!(
            decide(10, 100, Some(998.0), 5.0, 1000.0, false),
            Decision::Wait {
                pending_since: 998.0,
                remaining: 3.0
            }
        );
        let Decision::Export { reason } = decide(10, 100, Some(990.0), 5.0, 1000.0, false) else {
            panic!("the batch timeout has passed");
        };
        assert!(reason.contains("batch_timeout"), "{reason}");
        // A quarantined export is redone even without new games.
        assert!(matches!(
            decide(0, 100, None, 5.0, 1000.0, true),
            Decision::Export { .. }
        ));
    }

    fn make_db(path: &Path, completed: usize, aborted: usize) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "CREATE TABLE games (id INTEGER PRIMARY KEY AUTOINCREMENT, config_key TEXT, status TEXT);",
        )
        .unwrap();
        for _ in 0..completed {
            conn.execute(
                "INSERT INTO games (config_key, status) VALUES ('hex8_2p', 'completed')",
                [],
            )
            .unwrap();
        }
        for _ in 0..aborted {
            conn.execute(
                "INSERT INTO games (config_key, status) VALUES ('hex8_2p', 'aborted')",
                [],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO games (config_key, status) VALUES ('hex6_2p', 'completed')",
            [],
        )
        .unwrap();
    }

    #[test]
    fn counts_completed_games_of_the_key_above_the_last_id() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("g.db");
        assert_eq!(count_new_games(&db, "hex8_2p", 0).unwrap(), None);
        make_db(&db, 5, 2);
        let c = count_new_games(&db, "hex8_2p", 0).unwrap().unwrap();
        assert_eq!((c.new_games, c.max_new_id, c.max_id), (5, Some(5), Some(5)));
        assert_eq!(c.total, 5, "completed games of the key only");
        let c = count_new_games(&db, "hex8_2p", 3).unwrap().unwrap();
        assert_eq!((c.new_games, c.max_new_id), (2, Some(5)));
        let c = count_new_games(&db, "hex8_2p", 5).unwrap().unwrap();
        assert_eq!(
            (c.new_games, c.max_new_id, c.max_id, c.total),
            (0, None, Some(5), 5)
        );

        let corrupt = dir.path().join("corrupt.db");
        std::fs::write(
            &corrupt,
            b"this is not a sqlite database, just some bytes....",
        )
        .unwrap();
        assert!(count_new_games(&corrupt, "hex8_2p", 0).is_err());
    }

    #[test]
    fn a_valid_export_is_summarised_and_a_truncated_one_refused_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let mut data = Dataset::new(&config.key.to_string(), config.num_features());
        let mut rng = Rng::with_seed(1);
        for id in [3, 4, 9] {
            let record = play_game(&config, [None, None], 0.0, &mut rng);
            samples(&config, &record.moves, |f, o| data.push(f, o, id)).unwrap();
        }
        let path = dir.path().join("hex6_2p.npz");
        let bytes = data.encode().unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let s = validate_npz(&path, "hex6_2p").unwrap();
        assert_eq!(
            (s.samples, s.games, s.last_game_id),
            (data.len() as u64, 3, Some(9))
        );
        assert!(validate_npz(&path, "hex8_2p").is_err());

        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(validate_npz(&path, "hex6_2p").is_err());
        let bad = quarantine(&path).unwrap();
        assert!(!path.exists() && bad.ends_with("hex6_2p.npz.bad"));

        let empty = Dataset::new(&config.key.to_string(), config.num_features());
        std::fs::write(&path, empty.encode().unwrap()).unwrap();
        let err = validate_npz(&path, "hex6_2p").unwrap_err().to_string();
        assert!(err.contains("no samples"), "{err}");
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordination/auto_export.json");
        let mut state = State::default();
        state.keys.insert(
            "hex8_2p".into(),
            KeyState {
                last_game_id: 42,
                pending_since: Some(7.5),
                last_export_at: Some(8.0),
                last_samples: 900,
                last_skipped_rows: 1,
                failing: Some(Failing::after(None, "export job failed".into(), 9.0, 0.0)),
                failing_job: None,
            },
        );
        save_state(&path, &state).unwrap();
        let back: State = load_state(&path);
        assert_eq!(back, state);

        // A state file written before skipped rows and retries were kept still loads.
        std::fs::write(
            &path,
            r#"{"keys": {"hex8_2p": {"last_game_id": 42, "pending_since": null,
                                    "last_export_at": 8.0, "last_samples": 900}}}"#,
        )
        .unwrap();
        let old: State = load_state(&path);
        let k = &old.keys["hex8_2p"];
        assert_eq!(
            (k.last_game_id, k.failing.clone(), k.last_skipped_rows),
            (42, None, 0)
        );
    }
}
