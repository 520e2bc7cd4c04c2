//! `job export`: completed games of the DB → an `.npz` of training samples.
//!
//! Every position before a move becomes one sample, from the perspective of the player to move,
//! labelled +1 if that player went on to win and -1 if not. Each game is replayed against the
//! rules first, so a damaged DB stops the export with the game's id rather than feeding training
//! nonsense. The file is written atomically and read back through the same validating reader the
//! train job uses before it replaces the previous export.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use ringrift::game::npz::Dataset;
use ringrift::game::{GameConfig, samples};
use serde_json::{Value, json};

use super::db::GamesDb;
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
}

pub(crate) fn run(config: &GameConfig, args: &ExportArgs) -> Result<Value> {
    let started = Instant::now();
    let db = GamesDb::open_existing(&args.db)?;
    let games = db.completed_games(&config.key, args.since_id)?;
    let mut data = Dataset::new(&config.key, config.num_features());
    for game in &games {
        let winner = samples(config, &game.moves, |features, outcome| {
            data.push(features, outcome, game.id);
        })
        .with_context(|| {
            format!(
                "game {} in {} cannot be replayed",
                game.id,
                args.db.display()
            )
        })?;
        if winner != game.winner {
            anyhow::bail!(
                "game {} in {}: stored winner is {} but the moves say {winner}",
                game.id,
                args.db.display(),
                game.winner
            );
        }
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
    let last_game_id = games.last().map_or(args.since_id, |g| g.id);
    Ok(json!({
        "job": "export",
        "config_key": config.key,
        "games": games.len(),
        "samples": data.len(),
        "num_features": data.num_features,
        "since_id": args.since_id,
        "last_game_id": last_game_id,
        "output": args.output.display().to_string(),
        "bytes": bytes.len(),
        "seconds": round6(started.elapsed().as_secs_f64()),
    }))
}

#[cfg(test)]
mod tests {
    use ringrift::game::rng::Rng;
    use ringrift::game::{GameRecord, play_game};

    use super::super::db::NewGame;
    use super::*;

    fn setup(dir: &std::path::Path, games: usize) -> (GameConfig, ExportArgs, Vec<GameRecord>) {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let db_path = dir.join("g.db");
        let mut rng = Rng::new(8);
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
    fn an_illegal_stored_game_or_a_wrong_winner_stops_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let (config, args, _) = setup(dir.path(), 2);
        let db = GamesDb::open_existing(&args.db).unwrap();
        db.connection()
            .execute("UPDATE games SET winner = 3 - winner WHERE id = 2", [])
            .unwrap();
        let err = format!("{:#}", run(&config, &args).unwrap_err());
        assert!(
            err.contains("game 2 in") && err.contains("stored winner"),
            "{err}"
        );
        db.connection()
            .execute(
                "UPDATE moves SET cell = 0 WHERE game_id = 1 AND move_number <= 2",
                [],
            )
            .unwrap();
        let err = format!("{:#}", run(&config, &args).unwrap_err());
        assert!(
            err.contains("game 1 in") && err.contains("cannot be replayed"),
            "{err}"
        );
        assert!(!args.output.exists(), "nothing written on failure");
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
