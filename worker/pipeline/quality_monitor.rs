//! quality_monitor: scores the latest selfplay games of each config key, so that training is not
//! fed degenerate data (games that end absurdly early or never, one side always winning, every game
//! opening the same way) without anyone noticing.
//!
//! The score is the mean of three components in [0, 1], computed by the pure [`score`]:
//! - length sanity: the fraction of games whose `total_moves` lies within `[min_moves, max_moves]`;
//! - outcome balance: `1 − |p1_win_rate − 0.5|·2`, with a tolerance: Hex gives the first player an
//!   edge, so on hex boards a first-player win rate within 0.25 of fair counts as fully balanced,
//!   and the score falls linearly from there to 0 when one side wins every game;
//! - opening diversity: distinct first moves / min(games, cells of the board).
//!
//! It scores each cycle (the reconciliation scan) and on NEW_GAMES_AVAILABLE, and emits
//! QUALITY_SCORE_UPDATED on the first score of a key or when the score moved by at least
//! [`UPDATE_DELTA`] since the last one it emitted, and LOW_QUALITY_DATA_WARNING once each time a
//! key's score crosses under the threshold. What it last emitted is kept in its state file, so a
//! restart neither repeats nor loses a warning. The games DB helpers here are shared with the
//! scheduler (it counts completed games with them).
//!
//! The state file is also the evidence behind its events: it is written before the events go out,
//! and the daemons that act on quality events (training_trigger pauses training, the scheduler
//! weighs keys) check each event against it with [`vouch`], so a forged LOW_QUALITY_DATA_WARNING
//! cannot pause training nor a forged QUALITY_SCORE_UPDATED resume it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ringrift::config_key::{Board, ConfigKey};
use ringrift::events::{Event, payload};
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Pipeline, load_state, save_state, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::QualitySettings;

/// A score change smaller than this is not worth an event.
pub(crate) const UPDATE_DELTA: f64 = 0.02;

const NAME: &str = "quality_monitor";

// ---------------------------------------------------------------- games DB (read side)

/// Opens an existing games DB for reading. `Ok(None)`: no games yet (no file, or an empty file that
/// selfplay is just creating). An error: the file is not a games DB or is damaged.
pub(crate) fn open_games_db(path: &Path) -> Result<Option<Connection>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    };
    if meta.len() == 0 {
        return Ok(None);
    }
    // Read-write without create: a read-only connection cannot always open a WAL database.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open games db {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'games'",
            [],
            |row| row.get(0),
        )
        .with_context(|| format!("games db {} is not readable", path.display()))?;
    if tables == 0 {
        bail!("games db {} has no games table", path.display());
    }
    Ok(Some(conn))
}

/// Completed games of `key` with an id above `after`, and the highest id among them (`after`
/// when none): one range of the index, however many games the DB holds. A DB whose highest id
/// of all lies below `after` was replaced (ids start again at 1): then every game counts, as if
/// `after` were 0. `None` when there is no DB yet.
pub(crate) fn count_since(path: &Path, key: &str, after: i64) -> Result<Option<(u64, i64)>> {
    let Some(conn) = open_games_db(path)? else {
        return Ok(None);
    };
    let highest: Option<i64> = conn
        .query_row("SELECT MAX(id) FROM games", [], |row| row.get(0))
        .with_context(|| format!("cannot read games db {}", path.display()))?;
    let after = if highest.unwrap_or(0) < after {
        0
    } else {
        after
    };
    let (n, max): (i64, i64) = conn
        .query_row(
            "SELECT count(*), COALESCE(MAX(id), ?2) FROM games
             WHERE config_key = ?1 AND status = 'completed' AND id > ?2",
            rusqlite::params![key, after],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .with_context(|| format!("cannot count games in {}", path.display()))?;
    Ok(Some((n as u64, max)))
}

/// Completed games of `key` in the DB at `path`; `None` when there is no DB yet.
pub(crate) fn count_completed(path: &Path, key: &str) -> Result<Option<u64>> {
    let Some(conn) = open_games_db(path)? else {
        return Ok(None);
    };
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM games WHERE config_key = ?1 AND status = 'completed'",
            [key],
            |row| row.get(0),
        )
        .with_context(|| format!("cannot count games in {}", path.display()))?;
    Ok(Some(n as u64))
}

/// What scoring needs of one game.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GameRow {
    pub winner: Option<i64>,
    pub total_moves: i64,
    /// The cell of move 1, if the game has one.
    pub first_move: Option<i64>,
}

/// The latest `window` completed games of `key`, newest first.
pub(crate) fn recent_games(conn: &Connection, key: &str, window: u64) -> Result<Vec<GameRow>> {
    let mut stmt = conn.prepare(
        "SELECT g.winner, g.total_moves, m.cell
         FROM (SELECT id, winner, total_moves FROM games
               WHERE config_key = ?1 AND status = 'completed' ORDER BY id DESC LIMIT ?2) g
         LEFT JOIN moves m ON m.game_id = g.id AND m.move_number = 1
         ORDER BY g.id DESC",
    )?;
    let rows = stmt.query_map(params![key, window as i64], |row| {
        Ok(GameRow {
            winner: row.get(0)?,
            total_moves: row.get(1)?,
            first_move: row.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------- scoring (pure)

/// Cells of a board type, the most distinct opening moves it allows.
/// How far from fair the first player's win rate may be before balance drops: Hex has a strong
/// first-player advantage, other boards much less.
pub(crate) fn balance_tolerance(board: Board) -> f64 {
    if board.as_str().starts_with("hex") {
        0.25
    } else {
        0.1
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ScoreParams {
    pub min_moves: i64,
    pub max_moves: i64,
    pub cells: usize,
    pub num_players: u8,
    pub tolerance: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Quality {
    pub score: f64,
    pub length: f64,
    pub balance: f64,
    pub diversity: f64,
    pub games: usize,
    pub p1_win_rate: Option<f64>,
}

impl Quality {
    /// Names the weakest component, for the warning's `reason`.
    pub(crate) fn reason(&self, p: &ScoreParams) -> String {
        let parts = [
            (
                self.length,
                format!(
                    "game length: {:.0}% of games within [{}, {}] moves",
                    self.length * 100.0,
                    p.min_moves,
                    p.max_moves
                ),
            ),
            (
                self.balance,
                match self.p1_win_rate {
                    Some(r) => format!("outcome balance: first player wins {:.0}%", r * 100.0),
                    None => "outcome balance: no game has a winner".to_string(),
                },
            ),
            (
                self.diversity,
                format!("opening diversity {:.2}", self.diversity),
            ),
        ];
        let (_, weakest) = parts
            .into_iter()
            .fold(None::<(f64, String)>, |acc, (v, s)| match acc {
                Some((best, _)) if best <= v => acc,
                _ => Some((v, s)),
            })
            .expect("three parts");
        format!(
            "score {:.3} over {} games; weakest: {weakest}",
            self.score, self.games
        )
    }
}

/// Scores a list of games; `None` when there are none.
pub(crate) fn score(games: &[GameRow], p: &ScoreParams) -> Option<Quality> {
    if games.is_empty() {
        return None;
    }
    let n = games.len() as f64;
    let sane = games
        .iter()
        .filter(|g| (p.min_moves..=p.max_moves).contains(&g.total_moves))
        .count();
    let length = sane as f64 / n;

    let decided: Vec<i64> = games.iter().filter_map(|g| g.winner).collect();
    let p1_win_rate = (!decided.is_empty())
        .then(|| decided.iter().filter(|&&w| w == 1).count() as f64 / decided.len() as f64);
    let balance = match p1_win_rate {
        None => 0.0,
        Some(rate) => {
            let fair = 1.0 / f64::from(p.num_players.max(2));
            let worst = fair.max(1.0 - fair);
            let off = ((rate - fair).abs() - p.tolerance).max(0.0);
            let room = (worst - p.tolerance).max(f64::EPSILON);
            (1.0 - off / room).clamp(0.0, 1.0)
        }
    };

    let mut firsts: Vec<i64> = games.iter().filter_map(|g| g.first_move).collect();
    firsts.sort_unstable();
    firsts.dedup();
    let possible = games.len().min(p.cells.max(1));
    let diversity = (firsts.len() as f64 / possible as f64).min(1.0);

    Some(Quality {
        score: (length + balance + diversity) / 3.0,
        length,
        balance,
        diversity,
        games: games.len(),
        p1_win_rate,
    })
}

/// What was last emitted for one key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct KeyState {
    pub last_emitted: Option<f64>,
    /// A warning was emitted and the score has not come back over the threshold since.
    pub warned: bool,
    /// The threshold the score is under while `warned`.
    #[serde(default)]
    pub warned_threshold: Option<f64>,
}

/// Which events a new score calls for: (QUALITY_SCORE_UPDATED, LOW_QUALITY_DATA_WARNING), and the
/// key's state afterwards.
pub(crate) fn decide(prev: &KeyState, score: f64, threshold: f64) -> (bool, bool, KeyState) {
    let update = prev
        .last_emitted
        .is_none_or(|last| (score - last).abs() >= UPDATE_DELTA - 1e-12);
    let below = score < threshold;
    let warn = below && !prev.warned;
    let next = KeyState {
        last_emitted: if update {
            Some(score)
        } else {
            prev.last_emitted
        },
        warned: below,
        warned_threshold: below.then_some(threshold),
    };
    (update, warn, next)
}

/// What the quality monitor's own state says of a key, for a daemon acting on a quality event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Vouched {
    /// The monitor's last published score.
    pub score: f64,
    /// The data is flagged low...
    pub warned: bool,
    /// ...under this threshold (unknown in state files written before it was recorded).
    pub threshold: Option<f64>,
}

/// Checks a quality event (`event_type` with its `score`) for `key` against the quality
/// monitor's state file. `Ok(None)`: there is no state file (no built-in quality monitor has
/// scored yet, or the events come from a monitor of the user's own), so only the supervisor's
/// check of who may emit the event stands behind it. `Err(why)`: the state contradicts the event.
pub(crate) fn vouch(
    pipeline: &Pipeline,
    key: &str,
    event_type: &str,
    score: f64,
) -> Result<Option<Vouched>, Unvouched> {
    let path = pipeline.state_path(NAME);
    if !path.exists() {
        return Ok(None);
    }
    let state: State = load_state(&path);
    let Some(ks) = state.keys.get(key) else {
        return Err(Unvouched::NotScored {
            key: key.to_string(),
            path,
        });
    };
    // A warning may carry a score that moved less than UPDATE_DELTA since the last update.
    let last = ks.last_emitted.unwrap_or(f64::NAN);
    let agrees = (score - last).abs() < UPDATE_DELTA + 1e-4;
    if !agrees {
        return Err(Unvouched::Score { score, last, path });
    }
    if event_type == "LOW_QUALITY_DATA_WARNING" && !ks.warned {
        return Err(Unvouched::NotLow {
            key: key.to_string(),
            path,
        });
    }
    Ok(Some(Vouched {
        score: last,
        warned: ks.warned,
        threshold: ks.warned_threshold,
    }))
}

/// How the quality monitor's state file (`path`) contradicts a quality event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum Unvouched {
    #[error("the quality monitor has not scored {key} ({})", path.display())]
    NotScored { key: String, path: PathBuf },
    #[error("score {score} is not the quality monitor's ({last} in {})", path.display())]
    Score {
        score: f64,
        last: f64,
        path: PathBuf,
    },
    #[error("the quality monitor does not flag {key} low ({})", path.display())]
    NotLow { key: String, path: PathBuf },
}

// ---------------------------------------------------------------- the daemon

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    keys: BTreeMap<String, KeyState>,
}

/// How the last look at one key went.
#[derive(Debug, Clone)]
enum Seen {
    NoGames,
    Scored(Quality),
    Error(String),
}

pub(crate) struct QualityMonitor {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    window: u64,
    threshold: f64,
    min_moves: i64,
    max_moves: i64,
    state: State,
    seen: BTreeMap<String, (Seen, String)>,
    scored: u64,
    updates: u64,
    warnings: u64,
    errors: u64,
}

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(QualityMonitor {
        ctx: None,
        pipeline: None,
        window: 200,
        threshold: 0.5,
        min_moves: 5,
        max_moves: 500,
        state: State::default(),
        seen: BTreeMap::new(),
        scored: 0,
        updates: 0,
        warnings: 0,
        errors: 0,
    })
}

impl QualityMonitor {
    fn params(&self, key: &str) -> ScoreParams {
        let key = key.parse().unwrap_or(ConfigKey::HEX8_2P);
        ScoreParams {
            min_moves: self.min_moves,
            max_moves: self.max_moves,
            cells: key.board().cells(),
            num_players: key.players(),
            tolerance: balance_tolerance(key.board()),
        }
    }

    /// Scores one key and emits what the score calls for.
    fn check(&mut self, key: &str) {
        let pipeline = self.pipeline.as_ref().expect("started");
        let path = pipeline.games_db(key);
        let params = self.params(key);
        let result = open_games_db(&path).and_then(|conn| match conn {
            None => Ok(None),
            Some(conn) => recent_games(&conn, key, self.window)
                .with_context(|| format!("cannot read games from {}", path.display()))
                .map(|games| score(&games, &params)),
        });
        let when = ringrift::timefmt::now_rfc3339();
        let seen = match result {
            Ok(None) => Seen::NoGames,
            Err(e) => {
                self.errors += 1;
                eprintln!("{NAME}: {key}: {e:#}");
                Seen::Error(format!("{e:#}"))
            }
            Ok(Some(q)) => {
                self.scored += 1;
                let prev = self.state.keys.get(key).cloned().unwrap_or_default();
                let (update, warn, next) = decide(&prev, q.score, self.threshold);
                let score = round4(q.score);
                // The state first: it is the evidence the consumers check the events against.
                if next != prev {
                    self.state.keys.insert(key.to_string(), next);
                    let path = pipeline.state_path(NAME);
                    if let Err(e) = save_state(&path, &self.state) {
                        eprintln!("{NAME}: cannot save state to {}: {e:#}", path.display());
                    }
                }
                if update {
                    self.updates += 1;
                    println!(
                        "{NAME}: {key}: score {score} over {} games (length {:.2}, balance {:.2}, diversity {:.2})",
                        q.games, q.length, q.balance, q.diversity
                    );
                    super::emit(
                        self.ctx.as_ref(),
                        "QUALITY_SCORE_UPDATED",
                        payload([
                            ("config_key", key.into()),
                            ("score", score.into()),
                            ("games", (q.games as u64).into()),
                        ]),
                    );
                }
                if warn {
                    self.warnings += 1;
                    let reason = q.reason(&params);
                    println!("{NAME}: {key}: LOW QUALITY: {reason}");
                    super::emit(
                        self.ctx.as_ref(),
                        "LOW_QUALITY_DATA_WARNING",
                        payload([
                            ("config_key", key.into()),
                            ("score", score.into()),
                            ("threshold", self.threshold.into()),
                            ("reason", reason.into()),
                        ]),
                    );
                }
                Seen::Scored(q)
            }
        };
        self.seen.insert(key.to_string(), (seen, when));
    }

    fn report(&self) -> Report {
        let mut parts = Vec::new();
        let mut problems = Vec::new();
        let mut details = BTreeMap::new();
        for (key, (seen, when)) in &self.seen {
            let (text, detail) = match seen {
                Seen::NoGames => ("no games yet".to_string(), Value::from("no games yet")),
                Seen::Scored(q) => (
                    format!(
                        "{:.3} over {} games{}",
                        q.score,
                        q.games,
                        if q.score < self.threshold {
                            " (LOW)"
                        } else {
                            ""
                        }
                    ),
                    serde_json::json!({
                        "score": round4(q.score), "games": q.games, "length": round4(q.length),
                        "balance": round4(q.balance), "diversity": round4(q.diversity),
                        "p1_win_rate": q.p1_win_rate.map(round4), "at": when,
                    }),
                ),
                Seen::Error(e) => {
                    problems.push(format!("{key}: {e}"));
                    (
                        format!("error: {e}"),
                        serde_json::json!({"error": e, "at": when}),
                    )
                }
            };
            parts.push(format!("{key}: {text}"));
            details.insert(key.clone(), detail);
        }
        details.insert("threshold".into(), self.threshold.into());
        details.insert("window_games".into(), self.window.into());
        let healthy = problems.is_empty();
        let message = if parts.is_empty() {
            "no scan yet".to_string()
        } else if healthy {
            parts.join("; ")
        } else {
            format!("cannot score: {}", problems.join("; "))
        };
        Report::new(
            healthy,
            message,
            details,
            [
                ("scored", self.scored),
                ("score_updates", self.updates),
                ("low_quality_warnings", self.warnings),
                ("errors", self.errors),
            ],
        )
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

impl Daemon for QualityMonitor {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["NEW_GAMES_AVAILABLE".into()]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, QualitySettings::from_map)?;
            self.window = s.window_games;
            self.threshold = s.threshold;
            self.min_moves = i64::try_from(s.min_moves).unwrap_or(i64::MAX);
            self.max_moves = i64::try_from(s.max_moves).unwrap_or(i64::MAX);
            self.state = load_state(&pipeline.state_path(NAME));
            println!(
                "{NAME}: scoring the latest {} games of {} (threshold {}, moves {}..={})",
                self.window,
                pipeline.config_keys.join(", "),
                self.threshold,
                self.min_moves,
                self.max_moves
            );
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            let keys = self.pipeline.as_ref().expect("started").config_keys.clone();
            for key in keys {
                self.check(&key);
            }
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            let key = event.payload.get("config_key")?.as_str()?.to_string();
            let known = self
                .pipeline
                .as_ref()
                .is_some_and(|p| p.config_keys.contains(&key));
            if !known {
                println!(
                    "{NAME}: ignoring {} for {key}: not a pipeline config key",
                    event.event_type
                );
                return None;
            }
            let games_dir = self.pipeline.as_ref().expect("started").games_dir();
            if let Err(why) = Pipeline::check_event_path(&event, "db_path", &games_dir) {
                // Scored from this pipeline's own DB on the next cycle anyway.
                eprintln!("{NAME}: {key}: {why}");
                self.errors += 1;
                return Some(self.report());
            }
            self.check(&key);
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex8() -> ScoreParams {
        ScoreParams {
            min_moves: 5,
            max_moves: 500,
            cells: 64,
            num_players: 2,
            tolerance: 0.25,
        }
    }

    fn game(winner: i64, moves: i64, first: i64) -> GameRow {
        GameRow {
            winner: Some(winner),
            total_moves: moves,
            first_move: Some(first),
        }
    }

    #[test]
    fn healthy_games_score_one() {
        // 64 games, every opening different, first player wins 70 % (within Hex's tolerance).
        let games: Vec<GameRow> = (0..64)
            .map(|i| game(if i % 10 < 7 { 1 } else { 2 }, 30, i))
            .collect();
        let q = score(&games, &hex8()).unwrap();
        assert_eq!((q.length, q.balance, q.diversity), (1.0, 1.0, 1.0));
        assert_eq!(q.score, 1.0);
        assert_eq!(q.games, 64);
    }

    #[test]
    fn each_component_reacts_to_its_defect() {
        // Half the games are too short.
        let games: Vec<GameRow> = (0..10)
            .map(|i| game(1 + i % 2, if i < 5 { 2 } else { 30 }, i))
            .collect();
        let q = score(&games, &hex8()).unwrap();
        assert_eq!(q.length, 0.5);
        assert_eq!(q.balance, 1.0);
        assert_eq!(
            q.diversity, 1.0,
            "10 games, 10 openings: min(games, cells) = 10"
        );
        assert!((q.score - 2.5 / 3.0).abs() < 1e-12);

        // The first player wins everything: balance 0. At 87.5 %: halfway between tolerance and worst.
        let all_p1: Vec<GameRow> = (0..8).map(|i| game(1, 30, i)).collect();
        assert_eq!(score(&all_p1, &hex8()).unwrap().balance, 0.0);
        let mostly: Vec<GameRow> = (0..8)
            .map(|i| game(if i < 7 { 1 } else { 2 }, 30, i))
            .collect();
        assert!((score(&mostly, &hex8()).unwrap().balance - 0.5).abs() < 1e-12);
        // Without tolerance the plain formula applies: 1 − |0.75 − 0.5|·2 = 0.5.
        let strict = ScoreParams {
            tolerance: 0.0,
            ..hex8()
        };
        let three_in_four: Vec<GameRow> = (0..4)
            .map(|i| game(if i < 3 { 1 } else { 2 }, 30, i))
            .collect();
        assert!((score(&three_in_four, &strict).unwrap().balance - 0.5).abs() < 1e-12);
        assert_eq!(score(&three_in_four, &hex8()).unwrap().balance, 1.0);

        // Every game opens on the same cell: 1 distinct of min(100, 64).
        let same: Vec<GameRow> = (0..100).map(|i| game(1 + i % 2, 30, 27)).collect();
        let q = score(&same, &hex8()).unwrap();
        assert!((q.diversity - 1.0 / 64.0).abs() < 1e-12);
        assert!(
            q.reason(&hex8()).contains("opening diversity"),
            "{}",
            q.reason(&hex8())
        );

        // No decided game at all: balance 0; no game at all: no score.
        let undecided = vec![GameRow {
            winner: None,
            total_moves: 30,
            first_move: Some(1),
        }];
        assert_eq!(score(&undecided, &hex8()).unwrap().balance, 0.0);
        assert!(score(&[], &hex8()).is_none());
    }

    #[test]
    fn events_on_first_score_on_real_changes_and_once_per_crossing() {
        let s0 = KeyState::default();
        let (update, warn, s1) = decide(&s0, 0.8, 0.5);
        assert!(update && !warn);
        let (update, warn, s2) = decide(&s1, 0.81, 0.5);
        assert!(!update && !warn, "a change under 0.02 is not news");
        assert_eq!(s2.last_emitted, Some(0.8));
        let (update, warn, s3) = decide(&s2, 0.4, 0.5);
        assert!(update && warn);
        let (update, warn, s4) = decide(&s3, 0.3, 0.5);
        assert!(update && !warn, "still under: no second warning");
        let (_, warn, s5) = decide(&s4, 0.6, 0.5);
        assert!(!warn && !s5.warned);
        let (_, warn, _) = decide(&s5, 0.45, 0.5);
        assert!(warn, "a new crossing warns again");
    }

    #[test]
    fn quality_events_are_checked_against_the_monitors_state() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = Pipeline::for_test(dir.path(), vec!["hex8_2p".into()]);
        let warn = "LOW_QUALITY_DATA_WARNING";
        let update = "QUALITY_SCORE_UPDATED";
        // No state file: nothing to check against.
        assert_eq!(vouch(&pipeline, "hex8_2p", warn, 0.1), Ok(None));
        let (_, _, good) = decide(&KeyState::default(), 0.9, 0.5);
        let mut state = State::default();
        state.keys.insert("hex8_2p".into(), good);
        save_state(&pipeline.state_path(NAME), &state).unwrap();
        let err = vouch(&pipeline, "hex8_2p", warn, 0.9)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not flag"), "{err}");
        let err = vouch(&pipeline, "hex8_2p", update, 0.2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the quality monitor's"), "{err}");
        assert!(
            vouch(&pipeline, "hex6_2p", update, 0.9).is_err(),
            "never scored"
        );
        let v = vouch(&pipeline, "hex8_2p", update, 0.9).unwrap().unwrap();
        assert!(!v.warned && v.score == 0.9);
        // A real warning: flagged under the monitor's threshold.
        let (_, _, low) = decide(&state.keys["hex8_2p"], 0.3, 0.5);
        state.keys.insert("hex8_2p".into(), low);
        save_state(&pipeline.state_path(NAME), &state).unwrap();
        let v = vouch(&pipeline, "hex8_2p", warn, 0.3).unwrap().unwrap();
        assert_eq!((v.warned, v.threshold), (true, Some(0.5)));
    }

    fn make_db(path: &Path, games: &[(i64, &[i64])]) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "CREATE TABLE games (id INTEGER PRIMARY KEY AUTOINCREMENT, config_key TEXT, board_type TEXT,
               num_players INTEGER, created_at TEXT, completed_at TEXT, status TEXT, winner INTEGER,
               total_moves INTEGER, source TEXT);
             CREATE TABLE moves (game_id INTEGER, move_number INTEGER, player INTEGER, cell INTEGER,
               PRIMARY KEY (game_id, move_number));",
        )
        .unwrap();
        for (winner, moves) in games {
            conn.execute(
                "INSERT INTO games (config_key, board_type, num_players, created_at, status, winner, total_moves, source)
                 VALUES ('hex8_2p', 'hex8', 2, 'now', 'completed', ?1, ?2, 'selfplay')",
                params![winner, moves.len() as i64],
            )
            .unwrap();
            let id = conn.last_insert_rowid();
            for (i, cell) in moves.iter().enumerate() {
                conn.execute(
                    "INSERT INTO moves VALUES (?1, ?2, ?3, ?4)",
                    params![id, i as i64 + 1, 1 + (i % 2) as i64, cell],
                )
                .unwrap();
            }
        }
        conn.execute(
            "INSERT INTO games (config_key, board_type, num_players, created_at, status, winner, total_moves, source)
             VALUES ('hex8_2p', 'hex8', 2, 'now', 'aborted', NULL, 0, 'selfplay')",
            [],
        )
        .unwrap();
    }

    #[test]
    fn reads_the_latest_completed_games_and_refuses_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hex8_2p.db");
        assert!(
            open_games_db(&path).unwrap().is_none(),
            "missing = no games yet"
        );
        assert_eq!(count_completed(&path, "hex8_2p").unwrap(), None);
        make_db(&path, &[(1, &[3, 4, 5]), (2, &[9, 1]), (1, &[3, 7, 8, 9])]);
        assert_eq!(count_completed(&path, "hex8_2p").unwrap(), Some(3));
        assert_eq!(count_completed(&path, "hex6_2p").unwrap(), Some(0));
        assert_eq!(count_since(&path, "hex8_2p", 1).unwrap(), Some((2, 3)));
        assert_eq!(count_since(&path, "hex8_2p", 3).unwrap(), Some((0, 3)));
        // An id above the DB's highest: a replaced DB, counted from its start.
        assert_eq!(count_since(&path, "hex8_2p", 90).unwrap(), Some((3, 3)));
        let conn = open_games_db(&path).unwrap().unwrap();
        let rows = recent_games(&conn, "hex8_2p", 2).unwrap();
        assert_eq!(rows, vec![game(1, 4, 3), game(2, 2, 9)]);

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let err = format!("{:#}", open_games_db(&garbage).err().unwrap());
        assert!(
            err.contains("not readable") || err.contains("not a database"),
            "{err}"
        );
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert!(open_games_db(&empty).unwrap().is_none());
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(format!("{:#}", open_games_db(&foreign).err().unwrap()).contains("no games table"));
    }
}
