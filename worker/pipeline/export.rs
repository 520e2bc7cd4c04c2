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
//!   never sees it, and the export is retried next cycle. The NPZ events have no failure type, so a
//!   failure shows in health and the log only.
//! - The DB is opened read-only with a busy timeout: selfplay keeps writing while we count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ringrift::events::{Event, payload};
use ringrift::game::npz::Dataset;
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    KeyStatus, Pipeline, job_failure, key_messages, load_state, now_secs, save_daemon_state, typed,
};
use crate::daemons::{Daemon, LocalBoxFuture, Report};
use crate::runtime::{Ctx, Settings};
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
/// and the highest completed id overall (to notice a DB that was replaced and restarted its ids).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DbCount {
    new_games: u64,
    max_new_id: Option<i64>,
    max_id: Option<i64>,
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
    let max_id: Option<i64> = conn
        .query_row(
            "SELECT MAX(id) FROM games WHERE config_key = ?1 AND status = 'completed'",
            params![key],
            |row| row.get(0),
        )
        .with_context(|| format!("games db {} is not readable", db.display()))?;
    Ok(Some(DbCount {
        new_games: new_games.max(0) as u64,
        max_new_id,
        max_id,
    }))
}

/// What a finished export holds.
#[derive(Debug, Clone, PartialEq)]
struct ExportSummary {
    samples: u64,
    games: u64,
    last_game_id: Option<i64>,
}

/// Decodes an export and checks it is usable for `key`.
fn validate_npz(path: &Path, key: &str) -> anyhow::Result<ExportSummary> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let data = Dataset::decode(&bytes)
        .with_context(|| format!("{} is not a valid NPZ", path.display()))?;
    anyhow::ensure!(
        data.config_key == key,
        "{} holds {} samples, not {key}",
        path.display(),
        data.config_key
    );
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
    state: State,
    status: BTreeMap<String, KeyStatus>,
    scans: u64,
    exports: u64,
    failures: u64,
    games_exported: u64,
    samples_exported: u64,
    last_error: Option<String>,
}

impl AutoExport {
    fn report(&self) -> Report {
        let healthy = self.status.values().all(|s| s.ok);
        let idle = self.status.is_empty()
            || self
                .status
                .values()
                .all(|s| s.message.contains("no games yet"));
        let message = key_messages(&self.status, "no scan yet");
        let keys: serde_json::Map<String, Value> = self
            .state
            .keys
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    json!({"last_game_id": s.last_game_id, "pending_since": s.pending_since,
                           "last_export_at": s.last_export_at, "last_samples": s.last_samples}),
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
        Report::with_status(
            healthy,
            status,
            message,
            BTreeMap::from([
                ("keys".to_string(), Value::Object(keys)),
                ("threshold_games".to_string(), Value::from(self.threshold)),
                ("batch_timeout".to_string(), Value::from(self.batch_timeout)),
                ("last_error".to_string(), json!(self.last_error)),
            ]),
            [
                ("scans", self.scans),
                ("exports", self.exports),
                ("export_failures", self.failures),
                ("games_exported", self.games_exported),
                ("samples_exported", self.samples_exported),
            ],
        )
    }

    fn set(&mut self, key: &str, ok: bool, message: String) {
        if !ok {
            eprintln!("{NAME}: {key}: {message}");
            self.last_error = Some(format!(
                "{} {key}: {message}",
                ringrift::timefmt::now_rfc3339()
            ));
        }
        self.status
            .insert(key.to_string(), KeyStatus { ok, message });
    }

    fn save(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        if let Err(msg) = save_daemon_state(pipeline, NAME, &self.state) {
            eprintln!("{NAME}: {msg}");
            self.last_error = Some(msg);
        }
    }

    /// Looks at one key and exports when the rule says so.
    async fn check_key(&mut self, key: &str) {
        let pipeline = self.pipeline.clone().expect("started");
        let db = pipeline.games_db(key);
        let mut ks = self.state.keys.get(key).cloned().unwrap_or_default();
        let mut counted = count_new_games(&db, key, ks.last_game_id);
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
                self.set(
                    key,
                    true,
                    format!("no games yet ({} does not exist)", db.display()),
                );
                return;
            }
            Ok(Some(c)) => c,
            Err(e) => {
                self.failures += 1;
                self.set(
                    key,
                    false,
                    format!("games db unreadable, retrying next cycle: {e:#}"),
                );
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
                if ks.pending_since.take().is_some() {
                    self.state.keys.insert(key.to_string(), ks.clone());
                    self.save();
                }
                let last = match ks.last_export_at {
                    Some(_) => format!(
                        "up to date (last export: games up to id {}, {} samples)",
                        ks.last_game_id, ks.last_samples
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
        let outcome = match pipeline
            .run_job(
                &ctx,
                "export",
                key,
                &[
                    ("games", count.new_games.to_string()),
                    ("npz_path", staging.display().to_string()),
                ],
            )
            .await
        {
            Ok(o) => o,
            Err(e) => {
                self.failures += 1;
                self.set(key, false, format!("cannot start the export job: {e:#}"));
                return;
            }
        };
        if !outcome.success {
            self.failures += 1;
            self.set(
                key,
                false,
                format!("{}; retrying next cycle", job_failure("export", &outcome)),
            );
            return;
        }
        let summary = match validate_npz(&staging, key) {
            Ok(s) => s,
            Err(e) => {
                self.failures += 1;
                let moved = quarantine(&staging)
                    .map(|p| format!("; moved to {}", p.display()))
                    .unwrap_or_default();
                self.set(
                    key,
                    false,
                    format!("export produced an unusable file: {e:#}{moved}; retrying next cycle"),
                );
                return;
            }
        };
        if let Err(e) = std::fs::rename(&staging, &npz) {
            self.failures += 1;
            self.set(
                key,
                false,
                format!(
                    "cannot move {} into place: {e}; retrying next cycle",
                    staging.display()
                ),
            );
            return;
        }
        let last_game_id = summary
            .last_game_id
            .or(count.max_new_id)
            .unwrap_or(ks.last_game_id)
            .max(ks.last_game_id);
        ks.last_game_id = last_game_id;
        ks.pending_since = None;
        ks.last_export_at = Some(now_secs());
        ks.last_samples = summary.samples;
        self.state.keys.insert(key.to_string(), ks);
        self.save();
        self.exports += 1;
        self.games_exported += count.new_games;
        self.samples_exported += summary.samples;
        self.set(
            key,
            true,
            format!(
                "exported at {}: {} games ({} new) → {} samples, games up to id {last_game_id}",
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
            ]),
        )
        .await;
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

    fn attach(&mut self, ctx: Ctx) {
        self.ctx = Some(ctx);
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["NEW_GAMES_AVAILABLE".into()]
    }

    fn start<'a>(
        &'a mut self,
        settings: &'a Settings,
    ) -> LocalBoxFuture<'a, anyhow::Result<Report>> {
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, ExportSettings::from_map)?;
            self.threshold = s.threshold_games;
            self.batch_timeout = s.batch_timeout.as_secs_f64();
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
            let key = self
                .pipeline
                .as_ref()
                .expect("started")
                .event_config_key(NAME, &event)?;
            let games_dir = self.pipeline.as_ref().expect("started").games_dir();
            // The export reads this pipeline's own games DB; an event naming a DB elsewhere is not
            // one of the pipeline's (there is no export failure event: logged and in health).
            if let Err(why) = Pipeline::check_event_path(&event, "db_path", &games_dir) {
                eprintln!("{NAME}: {key}: {why}");
                self.last_error =
                    Some(format!("{} {key}: {why}", ringrift::timefmt::now_rfc3339()));
                return Some(self.report());
            }
            self.check_key(&key).await;
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use ringrift::game::GameConfig;
    use ringrift::game::rng::Rng;
    use ringrift::game::{play_game, samples};

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
        let c = count_new_games(&db, "hex8_2p", 3).unwrap().unwrap();
        assert_eq!((c.new_games, c.max_new_id), (2, Some(5)));
        let c = count_new_games(&db, "hex8_2p", 5).unwrap().unwrap();
        assert_eq!((c.new_games, c.max_new_id, c.max_id), (0, None, Some(5)));

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
        let mut data = Dataset::new(&config.key, config.num_features());
        let mut rng = Rng::new(1);
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

        let empty = Dataset::new(&config.key, config.num_features());
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
            },
        );
        save_state(&path, &state).unwrap();
        let back: State = load_state(&path);
        assert_eq!(back, state);
    }
}
