//! The ratings DB (`data/ratings.db`): every evaluation game a decided candidate played, the Elo
//! ladder fitted over them ([`ringrift::ratings`]), and the promotion record. auto_promotion is
//! its only writer (in a cluster: the holder of the key's lease); anyone may read it with
//! `sqlite3`.
//!
//! Schema (players are `random`, `heuristic`, or a model's SHA-256 in hex):
//!
//! ```sql
//! matches(id INTEGER PRIMARY KEY, config_key TEXT, player TEXT, opponent TEXT, wins INTEGER,
//!         losses INTEGER, draws INTEGER, evaluation TEXT (the results file), recorded_at REAL,
//!         UNIQUE (config_key, player, opponent, evaluation))
//! models(config_key TEXT, sha256 TEXT, name TEXT (the candidate's file), first_seen REAL,
//!        PRIMARY KEY (config_key, sha256))
//! ratings(config_key TEXT, player TEXT, elo REAL, games INTEGER, fitted_at REAL,
//!         PRIMARY KEY (config_key, player))
//! promotions(id INTEGER PRIMARY KEY, config_key TEXT, generation INTEGER, candidate TEXT,
//!            sha256 TEXT, previous_sha256 TEXT, evaluation TEXT (the results file's JSON),
//!            ratings TEXT (JSON: player → {elo, games} at the decision), rating_elo REAL,
//!            promoted_at REAL, UNIQUE (config_key, generation))
//! ```
//!
//! Matches are recorded once per results file (a decision retried after a failed swap adds
//! nothing), so the ladder counts every game exactly once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use ringrift::ratings::{Match, Rating, fit};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS matches (
    id INTEGER PRIMARY KEY,
    config_key TEXT NOT NULL,
    player TEXT NOT NULL,
    opponent TEXT NOT NULL,
    wins INTEGER NOT NULL,
    losses INTEGER NOT NULL,
    draws INTEGER NOT NULL,
    evaluation TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    UNIQUE (config_key, player, opponent, evaluation)
);
CREATE TABLE IF NOT EXISTS models (
    config_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (config_key, sha256)
);
CREATE TABLE IF NOT EXISTS ratings (
    config_key TEXT NOT NULL,
    player TEXT NOT NULL,
    elo REAL NOT NULL,
    games INTEGER NOT NULL,
    fitted_at REAL NOT NULL,
    PRIMARY KEY (config_key, player)
);
CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY,
    config_key TEXT NOT NULL,
    generation INTEGER NOT NULL,
    candidate TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    previous_sha256 TEXT,
    evaluation TEXT NOT NULL,
    ratings TEXT NOT NULL,
    rating_elo REAL,
    promoted_at REAL NOT NULL,
    UNIQUE (config_key, generation)
);
";

/// The games of a results file as matches of the candidate (`sha256`): against random play,
/// the heuristic player, the baseline (`baseline_sha256`, when it played one) and each pinned
/// reference (`references[].sha256`). Counts missing from a plug-in's file are derived from its
/// win rate and games; an opponent without a count is left out. Games not won are losses (the
/// built-in game has no draws; a file may give `draws_vs_<opponent>`).
pub(crate) fn matches_of(v: &Value, sha256: &str, baseline_sha256: Option<&str>) -> Vec<Match> {
    let count = |f: &str| v.get(f).and_then(Value::as_u64);
    let versus = |suffix: &str, opponent: &str| -> Option<Match> {
        let games = count(&format!("games_vs_{suffix}")).filter(|&g| g > 0)?;
        let wins = count(&format!("wins_vs_{suffix}")).or_else(|| {
            let rate = v.get(format!("win_rate_vs_{suffix}"))?.as_f64()?;
            Some((rate.clamp(0.0, 1.0) * games as f64).round() as u64)
        })?;
        let draws = count(&format!("draws_vs_{suffix}")).unwrap_or(0);
        let (wins, draws) = (wins.min(games), draws.min(games - wins.min(games)));
        Some(Match {
            player: sha256.to_string(),
            opponent: opponent.to_string(),
            wins,
            losses: games - wins - draws,
            draws,
        })
    };
    let mut out: Vec<Match> = [
        versus("random", "random"),
        versus("heuristic", "heuristic"),
        baseline_sha256
            .filter(|b| *b != sha256)
            .and_then(|b| versus("baseline", b)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for r in v
        .get("references")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(sha), Some(games), Some(wins)) = (
            r.get("sha256").and_then(Value::as_str),
            r.get("games").and_then(Value::as_u64),
            r.get("wins").and_then(Value::as_u64),
        ) else {
            continue;
        };
        if sha != sha256 && games > 0 {
            out.push(Match {
                player: sha256.to_string(),
                opponent: sha.to_string(),
                wins: wins.min(games),
                losses: games - wins.min(games),
                draws: 0,
            });
        }
    }
    out
}

/// What a promotion is recorded with.
pub(crate) struct Promotion<'a> {
    pub key: &'a str,
    pub candidate: &'a str,
    pub sha256: &'a str,
    pub previous_sha256: Option<&'a str>,
    pub evaluation: &'a Value,
    pub ratings: &'a BTreeMap<String, Rating>,
    pub at: f64,
}

pub(crate) struct RatingsDb {
    conn: Connection,
}

impl RatingsDb {
    /// Opens (creating) `data/ratings.db` under `root`. A file that is not a usable SQLite DB
    /// (damaged, or garbage) is moved aside as `ratings.db.bad-<unix secs>` (with its `-wal` and
    /// `-shm`), said on stderr, and a fresh ladder started: the ladder is a record, and losing it
    /// must not stop promotions nor leave them unrecorded.
    pub(crate) fn open(root: &Path) -> Result<RatingsDb> {
        let path = root.join("data/ratings.db");
        let open = || -> Result<Connection> {
            let conn = ringrift::sqlite::create(&path, "ratings db", Duration::from_secs(10))?;
            conn.execute_batch(SCHEMA)
                .with_context(|| format!("cannot set up ratings db {}", path.display()))?;
            conn.query_row("SELECT COUNT(*) FROM promotions", [], |r| {
                r.get::<_, i64>(0)
            })
            .with_context(|| format!("cannot read ratings db {}", path.display()))?;
            Ok(conn)
        };
        match open() {
            Ok(conn) => Ok(RatingsDb { conn }),
            Err(e) if damaged(&e) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".bad-{secs}"));
                for suffix in ["", "-wal", "-shm"] {
                    let mut from = path.as_os_str().to_owned();
                    from.push(suffix);
                    let mut to = aside.clone();
                    to.push(suffix);
                    let _ = std::fs::rename(&from, &to);
                }
                eprintln!(
                    "ratings db {} is damaged ({e:#}): moved aside to {}; a fresh ladder starts",
                    path.display(),
                    Path::new(&aside).display()
                );
                Ok(RatingsDb { conn: open()? })
            }
            Err(e) => Err(e),
        }
    }

    /// Records the matches of one results file (`evaluation`, its path) once, names the model,
    /// and re-fits the key's ladder; returns the ratings.
    pub(crate) fn record(
        &mut self,
        key: &str,
        evaluation: &str,
        model: (&str, &str),
        matches: &[Match],
        now: f64,
    ) -> Result<BTreeMap<String, Rating>> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO models (config_key, sha256, name, first_seen) VALUES (?1, ?2, ?3, ?4)",
            params![key, model.0, model.1, now],
        )?;
        for m in matches {
            tx.execute(
                "INSERT OR IGNORE INTO matches (config_key, player, opponent, wins, losses, draws,
                 evaluation, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    key,
                    m.player,
                    m.opponent,
                    m.wins as i64,
                    m.losses as i64,
                    m.draws as i64,
                    evaluation,
                    now
                ],
            )?;
        }
        let all: Vec<Match> = {
            let mut stmt = tx.prepare(
                "SELECT player, opponent, wins, losses, draws FROM matches WHERE config_key = ?1",
            )?;
            stmt.query_map(params![key], |r| {
                Ok(Match {
                    player: r.get(0)?,
                    opponent: r.get(1)?,
                    wins: r.get::<_, i64>(2)?.max(0) as u64,
                    losses: r.get::<_, i64>(3)?.max(0) as u64,
                    draws: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        let ratings = fit(&all);
        tx.execute("DELETE FROM ratings WHERE config_key = ?1", params![key])?;
        for (player, r) in &ratings {
            tx.execute(
                "INSERT INTO ratings (config_key, player, elo, games, fitted_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key, player, r.elo, r.games as i64, now],
            )?;
        }
        tx.commit()?;
        Ok(ratings)
    }

    /// Promotions of `key` so far: the generation of the current canonical model (0: none).
    pub(crate) fn generation(&self, key: &str) -> Result<u64> {
        let n: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(generation) FROM promotions WHERE config_key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// The fitted rating of `player` of `key`, if it has one.
    pub(crate) fn rating(&self, key: &str, player: &str) -> Result<Option<f64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT elo FROM ratings WHERE config_key = ?1 AND player = ?2",
                params![key, player],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records a promotion as the key's next generation; returns that generation.
    pub(crate) fn promoted(&mut self, p: &Promotion<'_>) -> Result<u64> {
        let generation = self.generation(p.key)? + 1;
        let ratings: serde_json::Map<String, Value> = p
            .ratings
            .iter()
            .map(|(k, r)| (k.clone(), json!({"elo": r.elo, "games": r.games})))
            .collect();
        self.conn.execute(
            "INSERT INTO promotions (config_key, generation, candidate, sha256, previous_sha256,
             evaluation, ratings, rating_elo, promoted_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                p.key,
                generation as i64,
                p.candidate,
                p.sha256,
                p.previous_sha256,
                p.evaluation.to_string(),
                Value::Object(ratings).to_string(),
                p.ratings.get(p.sha256).map(|r| r.elo),
                p.at
            ],
        )?;
        Ok(generation)
    }
}

/// Whether an error means the file is not a usable SQLite DB (as opposed to busy or unreadable
/// for the moment, which is retried, never moved aside).
fn damaged(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    [
        "not a database",
        "malformed",
        "not a usable sqlite database",
    ]
    .iter()
    .any(|n| text.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_results_file_becomes_matches_against_each_opponent() {
        let v = json!({
            "games_vs_random": 100, "wins_vs_random": 90,
            "games_vs_heuristic": 50, "win_rate_vs_heuristic": 0.2,
            "games_vs_baseline": 40, "wins_vs_baseline": 25,
            "references": [{"sha256": "r1", "games": 10, "wins": 7}, {"sha256": "c"}],
        });
        let m = matches_of(&v, "c", Some("b"));
        let got: Vec<(&str, u64, u64)> = m
            .iter()
            .map(|m| (m.opponent.as_str(), m.wins, m.losses))
            .collect();
        assert_eq!(
            got,
            [
                ("random", 90, 10),
                ("heuristic", 10, 40),
                ("b", 25, 15),
                ("r1", 7, 3)
            ]
        );
        assert!(matches_of(&json!({}), "c", None).is_empty());
    }

    #[test]
    fn matches_count_once_and_promotions_number_the_generations() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = RatingsDb::open(dir.path()).unwrap();
        let v = json!({"games_vs_random": 100, "wins_vs_random": 75});
        let m = matches_of(&v, "aaa", None);
        let r = db
            .record("hex8_2p", "a.eval.json", ("aaa", "a.bin"), &m, 1.0)
            .unwrap();
        let again = db
            .record("hex8_2p", "a.eval.json", ("aaa", "a.bin"), &m, 2.0)
            .unwrap();
        assert_eq!(r, again, "the same results file counts once");
        assert_eq!(r["aaa"].games, 100);
        assert!((r["aaa"].elo - 190.0).abs() < 10.0, "{r:?}");
        assert_eq!(db.generation("hex8_2p").unwrap(), 0);
        let p = Promotion {
            key: "hex8_2p",
            candidate: "a.bin",
            sha256: "aaa",
            previous_sha256: None,
            evaluation: &v,
            ratings: &r,
            at: 3.0,
        };
        assert_eq!(db.promoted(&p).unwrap(), 1);
        assert_eq!(db.promoted(&p).unwrap(), 2);
        assert_eq!(db.generation("hex6_2p").unwrap(), 0);
        let elo = db.rating("hex8_2p", "aaa").unwrap().unwrap();
        assert!((elo - r["aaa"].elo).abs() < 1e-9);
    }

    #[test]
    fn a_damaged_ratings_db_is_moved_aside_and_a_fresh_ladder_started() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/ratings.db"), vec![7u8; 8192]).unwrap();
        let db = RatingsDb::open(dir.path()).unwrap();
        assert_eq!(db.generation("hex8_2p").unwrap(), 0);
        let aside: Vec<String> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("ratings.db.bad-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }
}
