//! `job export`: completed games of the DB → an `.npz` of training samples.
//!
//! Every position before a move becomes one sample, from the perspective of the player to move,
//! labelled +1 if that player went on to win and -1 if not. Each game's rows are checked and the
//! game replayed against the rules first: a game that breaks either (a winner who is not a player,
//! a move off the board, a stored winner the moves contradict) is skipped, counted in the summary
//! (`skipped_rows`, the first few listed with their reasons) and named on stderr, so one bad row
//! never stops the export nor feeds training nonsense. The file is written atomically and read
//! back through the same validating reader the train job uses before it replaces the previous
//! export; the summary is also written to `<output>.summary.json` for auto_export.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::jobs::game::npz::Dataset;
use crate::jobs::game::{GameConfig, samples};
use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::db::{GamesDb, Skipped};
use super::{GameArgs, round6, write_atomic};

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) game: GameArgs,

    /// The games DB to read
    #[arg(long, value_name = "PATH")]
    pub(crate) db: PathBuf,

    /// The .npz to write (replaced atomically)
    #[arg(long, value_name = "NPZ")]
    pub(crate) output: PathBuf,

    /// Export only games with an id above this one (the previous summary's last_game_id)
    #[arg(long, value_name = "ID", default_value_t = 0)]
    pub(crate) since_id: i64,

    /// The replay window: keep the samples of at most this many of the newest games (0: every
    /// game read)
    #[arg(long, value_name = "GAMES", default_value_t = 0)]
    pub(crate) window: u64,

    /// The previous export to extend: its samples are kept (within the window) and only games
    /// above its highest game id are read from the DB. Empty, missing, unreadable, of another
    /// key or from a replaced DB: the window is read from the DB instead
    #[arg(long, value_name = "NPZ")]
    pub(crate) previous: Option<String>,
}

/// Skipped games listed by id and reason in the summary; beyond this only counted.
const SKIPPED_LISTED: usize = 20;

/// The file beside the output where the summary is also written (`<output>.summary.json`), for
/// auto_export, which reads `skipped_rows` from it: a job's stdout reaches only its log.
pub(crate) fn summary_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".summary.json");
    PathBuf::from(s)
}

/// The previous export, if it can be extended: it decodes, is of `config`'s key and shape, names
/// the game of every sample, and its newest game is still in the DB's id range (a games DB that
/// was replaced starts again at id 1). Why not is said on stderr.
fn previous(config: &GameConfig, path: &Path, db: &GamesDb) -> Option<Dataset> {
    let why = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => format!("cannot be read: {e}"),
        Ok(bytes) => match Dataset::decode(&bytes) {
            Err(e) => format!("does not decode: {e}"),
            Ok(d) if d.config_key != config.key.to_string() => {
                format!("is of config key {:?}", d.config_key)
            }
            Ok(d) if d.num_features != config.num_features() => {
                format!("has {} features per sample", d.num_features)
            }
            Ok(d) if d.game_ids.len() != d.len() => "names no game_ids".to_string(),
            Ok(d) => match db.max_id() {
                Ok(max) if d.game_ids.iter().max().copied().unwrap_or(0) <= max.unwrap_or(0) => {
                    return Some(d);
                }
                Ok(_) => "holds games above the DB's highest id (the DB was replaced)".into(),
                Err(e) => format!("cannot be compared with the DB: {e:#}"),
            },
        },
    };
    eprintln!(
        "previous export {} {why}: the window is read from the games DB",
        path.display()
    );
    None
}

/// Keeps the samples of the newest `window` distinct games of `data` (0: all of them).
fn keep_window(data: &mut Dataset, window: u64) {
    let mut ids: Vec<i64> = data.game_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    let Some(first) =
        (window > 0 && ids.len() as u64 > window).then(|| ids[ids.len() - window as usize])
    else {
        return;
    };
    let f = data.num_features;
    let mut kept = Dataset::new(&data.config_key, f);
    for (i, &id) in data.game_ids.iter().enumerate() {
        if id >= first {
            kept.push(&data.states[i * f..(i + 1) * f], data.outcomes[i], id);
        }
    }
    *data = kept;
}

pub(crate) fn run(config: &GameConfig, args: &ExportArgs) -> Result<Value> {
    let started = Instant::now();
    let db = GamesDb::open_existing(&args.db)?;
    let previous = args
        .previous
        .as_deref()
        .filter(|p| !p.is_empty())
        .and_then(|p| previous(config, Path::new(p), &db));
    let extended = previous.as_ref().map(|d| d.len());
    let mut since_id = args.since_id;
    if let Some(d) = &previous {
        since_id = since_id.max(d.game_ids.iter().max().copied().unwrap_or(0));
    }
    // Games older than the window are not read at all.
    if args.window > 0
        && let Some(start) = db.window_start(config, args.window)?
    {
        since_id = since_id.max(start - 1);
    }
    let read = db.completed_games(config, since_id)?;
    let mut skipped = read.skipped;
    let mut data =
        previous.unwrap_or_else(|| Dataset::new(&config.key.to_string(), config.num_features()));
    let mut exported = 0usize;
    for game in &read.games {
        // Replay into a scratch set first: a game that breaks the rules midway adds nothing.
        let mut one = Dataset::new(&config.key.to_string(), config.num_features());
        let replay = samples(config, &game.moves, |features, outcome| {
            one.push(features, outcome, game.id);
        });
        let problem = match replay {
            Err(e) => Some(format!("cannot be replayed: {e}")),
            Ok(winner) if winner != game.winner => Some(format!(
                "stored winner is {} but the moves say {winner}",
                game.winner
            )),
            Ok(_) => None,
        };
        match problem {
            Some(reason) => skipped.push(Skipped {
                id: game.id,
                reason,
            }),
            None => {
                exported += 1;
                data.states.extend(one.states);
                data.outcomes.extend(one.outcomes);
                data.game_ids.extend(one.game_ids);
            }
        }
    }
    keep_window(&mut data, args.window);
    let window_games = {
        let mut ids = data.game_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    skipped.sort_by_key(|s| s.id);
    for s in &skipped {
        eprintln!(
            "skipped game {} in {}: {}",
            s.id,
            args.db.display(),
            s.reason
        );
    }
    let bytes = data.encode().context("cannot encode the export")?;
    write_atomic(&args.output, &bytes, |tmp| {
        let back =
            std::fs::read(tmp).with_context(|| format!("cannot read back {}", tmp.display()))?;
        let decoded = Dataset::decode(&back).with_context(|| {
            format!("the export written to {} does not read back", tmp.display())
        })?;
        anyhow::ensure!(
            decoded == data,
            "the export read back differs from what was written"
        );
        Ok(())
    })?;
    // Skipped games count as read: the next export continues after them.
    let last_game_id = read.last_id.unwrap_or(since_id).max(since_id);
    let summary = json!({
        "job": "export",
        "config_key": config.key,
        "games": exported,
        "window_games": window_games,
        "window": args.window,
        "extended_samples": extended,
        "samples": data.len(),
        "num_features": data.num_features,
        "since_id": since_id,
        "last_game_id": last_game_id,
        "skipped_rows": skipped.len(),
        "skipped": skipped
            .iter()
            .take(SKIPPED_LISTED)
            .map(|s| json!({"id": s.id, "reason": s.reason}))
            .collect::<Vec<_>>(),
        "output": args.output.display().to_string(),
        "bytes": bytes.len(),
        "seconds": round6(started.elapsed().as_secs_f64()),
    });
    let side = summary_path(&args.output);
    write_atomic(&side, summary.to_string().as_bytes(), |_| Ok(()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use crate::jobs::game::{GameRecord, play_game};
    use fastrand::Rng;

    use super::super::db::NewGame;
    use super::*;

    fn setup(dir: &std::path::Path, games: usize) -> (GameConfig, ExportArgs, Vec<GameRecord>) {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let db_path = dir.join("g.db");
        let mut rng = Rng::with_seed(8);
        let records: Vec<GameRecord> = (0..games)
            .map(|_| play_game(&config, [None, None], 0.0, &mut rng))
            .collect();
        let new: Vec<NewGame> = records
            .iter()
            .map(|record| NewGame {
                record,
                created_at: "t0".into(),
                completed_at: "t1".into(),
            })
            .collect();
        GamesDb::create(&db_path)
            .unwrap()
            .insert_games(&config, "selfplay", &new)
            .unwrap();
        let args = ExportArgs {
            game: GameArgs {
                config_key: config.clone(),
                board_type: None,
                num_players: None,
            },
            db: db_path,
            output: dir.join("out/hex6_2p.npz"),
            since_id: 0,
            window: 0,
            previous: None,
        };
        (config, args, records)
    }

    #[test]
    fn exports_every_position_and_resumes_after_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut args, records) = setup(dir.path(), 4);
        let summary = run(&config, &args).unwrap();
        let moves: usize = records.iter().map(|r| r.moves.len()).sum();
        assert_eq!(summary["games"], 4);
        assert_eq!(summary["samples"], moves);
        assert_eq!(summary["last_game_id"], 4);
        let data = Dataset::decode(&std::fs::read(&args.output).unwrap()).unwrap();
        assert_eq!(data.len(), moves);
        assert_eq!(data.num_features, 75);
        assert_eq!(data.config_key, "hex6_2p");
        assert_eq!(data.game_ids[0], 1);
        assert_eq!(*data.game_ids.last().unwrap(), 4);
        // The first sample of game 1 is the empty board, player 1 to move.
        assert_eq!(
            data.outcomes[0],
            if records[0].winner == 1 { 1.0 } else { -1.0 }
        );

        args.since_id = 3;
        let summary = run(&config, &args).unwrap();
        assert_eq!(summary["games"], 1);
        assert_eq!(summary["samples"], records[3].moves.len());
        args.since_id = 4;
        let summary = run(&config, &args).unwrap();
        assert_eq!(
            (summary["games"].clone(), summary["last_game_id"].clone()),
            (0.into(), 4.into())
        );
    }

    #[test]
    fn an_illegal_game_an_impossible_or_wrong_winner_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (config, args, records) = setup(dir.path(), 4);
        let db = GamesDb::open_existing(&args.db).unwrap();
        let c = db.connection();
        c.execute("UPDATE games SET winner = 3 - winner WHERE id = 2", [])
            .unwrap();
        c.execute("UPDATE games SET winner = 9 WHERE id = 4", [])
            .unwrap();
        c.execute(
            "UPDATE moves SET cell = 0 WHERE game_id = 1 AND move_number <= 2",
            [],
        )
        .unwrap();
        let summary = run(&config, &args).unwrap();
        assert_eq!(summary["games"], 1);
        assert_eq!(summary["samples"], records[2].moves.len());
        assert_eq!(summary["skipped_rows"], 3);
        assert_eq!(summary["last_game_id"], 4, "skipped games count as read");
        let skipped = summary["skipped"].as_array().unwrap();
        let ids: Vec<i64> = skipped.iter().map(|s| s["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 4]);
        let reasons: Vec<&str> = skipped
            .iter()
            .map(|s| s["reason"].as_str().unwrap())
            .collect();
        assert!(reasons[0].starts_with("cannot be replayed"), "{reasons:?}");
        assert!(reasons[1].starts_with("stored winner is"), "{reasons:?}");
        assert_eq!(reasons[2], "winner 9 is not a player of this 2-player game");
        let data = Dataset::decode(&std::fs::read(&args.output).unwrap()).unwrap();
        assert!(data.game_ids.iter().all(|&id| id == 3));
        let side: Value =
            serde_json::from_slice(&std::fs::read(summary_path(&args.output)).unwrap()).unwrap();
        assert_eq!(side, summary);
    }

    fn ids_of(path: &Path) -> Vec<i64> {
        let mut ids = Dataset::decode(&std::fs::read(path).unwrap())
            .unwrap()
            .game_ids;
        ids.dedup();
        ids
    }

    #[test]
    fn the_replay_window_keeps_the_newest_games_and_extends_the_previous_export() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut args, _) = setup(dir.path(), 6);
        args.window = 4;
        let summary = run(&config, &args).unwrap();
        assert_eq!(
            ids_of(&args.output),
            [3, 4, 5, 6],
            "only the window is read"
        );
        assert_eq!(
            (summary["since_id"].clone(), summary["games"].clone()),
            (2.into(), 4.into())
        );

        // Two more games: extending the previous export reads only those two from the DB.
        let previous = dir.path().join("previous.npz");
        std::fs::rename(&args.output, &previous).unwrap();
        let mut rng = Rng::with_seed(9);
        let more: Vec<GameRecord> = (0..2)
            .map(|_| play_game(&config, [None, None], 0.0, &mut rng))
            .collect();
        let new: Vec<NewGame> = more
            .iter()
            .map(|record| NewGame {
                record,
                created_at: "t2".into(),
                completed_at: "t3".into(),
            })
            .collect();
        GamesDb::open_existing(&args.db)
            .unwrap()
            .insert_games(&config, "selfplay", &new)
            .unwrap();
        args.previous = Some(previous.display().to_string());
        let summary = run(&config, &args).unwrap();
        assert_eq!(summary["games"], 2, "{summary}");
        assert_eq!(summary["since_id"], 6);
        assert_eq!(summary["window_games"], 4);
        assert_eq!(ids_of(&args.output), [5, 6, 7, 8]);

        // A previous export from a replaced DB (ids above the DB's) is not extended.
        std::fs::rename(&args.output, &previous).unwrap();
        let db = GamesDb::open_existing(&args.db).unwrap();
        db.connection()
            .execute("DELETE FROM games WHERE id > 6", [])
            .unwrap();
        let summary = run(&config, &args).unwrap();
        assert_eq!(summary["extended_samples"], Value::Null, "{summary}");
        assert_eq!(ids_of(&args.output), [3, 4, 5, 6]);
        // An empty name means no previous export.
        args.previous = Some(String::new());
        run(&config, &args).unwrap();
        assert_eq!(ids_of(&args.output), [3, 4, 5, 6]);
    }

    #[test]
    fn pruning_keeps_the_newest_games_and_every_unexported_one() {
        let dir = tempfile::tempdir().unwrap();
        let (_, args, _) = setup(dir.path(), 10);
        let db = GamesDb::open_existing(&args.db).unwrap();
        assert_eq!(db.prune("hex6_2p", 0, 10).unwrap(), 0, "0 keeps every game");
        assert_eq!(
            db.prune("hex6_2p", 4, 3).unwrap(),
            3,
            "only exported games go"
        );
        assert_eq!(db.prune("hex6_2p", 4, 10).unwrap(), 3);
        let ids: Vec<i64> = db
            .connection()
            .prepare("SELECT id FROM games ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, [7, 8, 9, 10]);
        let orphans: i64 = db
            .connection()
            .query_row(
                "SELECT COUNT(*) FROM moves WHERE game_id NOT IN (SELECT id FROM games)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0, "moves go with their game");
        assert_eq!(db.prune("hex6_2p", 4, 10).unwrap(), 0);
    }

    #[test]
    fn a_corrupt_db_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (config, args, _) = setup(dir.path(), 1);
        std::fs::write(&args.db, b"this is not sqlite").unwrap();
        let _ = std::fs::remove_file(args.db.with_extension("db-wal"));
        let _ = std::fs::remove_file(args.db.with_extension("db-shm"));
        let err = format!("{:#}", run(&config, &args).unwrap_err());
        assert!(err.contains("not a usable sqlite database"), "{err}");
    }
}
