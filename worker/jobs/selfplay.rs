//! `job selfplay`: plays games with the current model and appends them to the games DB.
//!
//! With `--model` pointing at an existing file, both sides play that model with ε-greedy
//! exploration; with no model yet (the loop's first round) they play at random, which is what
//! the first training round learns from. Each game records which: the model file's SHA-256 in
//! the games table's `model` column (`random` without one). Games are written in batches, one
//! transaction each, so a killed job keeps every batch it finished.

use std::path::PathBuf;
use std::time::Instant;

use crate::jobs::game::model::Model;
use crate::jobs::game::{GameConfig, GameRecord, play_game};
use anyhow::{Context, Result};
use fastrand::Rng;
use ringrift::timefmt::now_rfc3339;
use serde_json::{Value, json};

use super::db::{GamesDb, NewGame, RANDOM_MODEL};
use super::{GameArgs, fresh_seed, parse_probability, round6};
use crate::pipeline::sha256;

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct SelfplayArgs {
    #[command(flatten)]
    pub(crate) game: GameArgs,

    /// Number of games to play
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) games: u32,

    /// The games DB to append to (created if missing), e.g. data/games/hex8_2p.db
    #[arg(long, value_name = "PATH")]
    pub(crate) db: PathBuf,

    /// The model to play with, if this file exists (random play otherwise)
    #[arg(long, value_name = "PATH")]
    pub(crate) model: Option<PathBuf>,

    /// Probability of a uniformly random move instead of the model's choice
    #[arg(long, value_name = "P", default_value = "0.1", value_parser = parse_probability)]
    pub(crate) epsilon: f32,

    /// Seed of the games (default: a fresh one, printed in the summary)
    #[arg(long, value_name = "S")]
    pub(crate) seed: Option<u64>,

    /// Games per DB transaction
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) batch: u32,
}

pub(crate) fn run(config: &GameConfig, args: &SelfplayArgs) -> Result<Value> {
    let started = Instant::now();
    // Read once: what is hashed for the `model` column is what plays.
    let (model, played_by) = match &args.model {
        Some(path) if path.exists() => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot use --model {}", path.display()))?;
            let model = Model::from_bytes(&bytes, config)
                .with_context(|| format!("cannot use --model {}", path.display()))?;
            (Some(model), sha256::hex_of(&bytes))
        }
        _ => (None, RANDOM_MODEL.to_string()),
    };
    let seed = args.seed.unwrap_or_else(fresh_seed);
    let mut rng = Rng::with_seed(seed);
    let mut db = GamesDb::create(&args.db)?;

    let mut wins = [0u64; 2];
    let mut moves = 0u64;
    let mut ids: Vec<i64> = Vec::new();
    let mut left = args.games;
    while left > 0 {
        let n = left.min(args.batch);
        left -= n;
        let mut batch: Vec<(GameRecord, String, String)> = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let created_at = now_rfc3339();
            let record = play_game(
                config,
                [model.as_ref(), model.as_ref()],
                args.epsilon,
                &mut rng,
            );
            wins[usize::from(record.winner - 1)] += 1;
            moves += record.moves.len() as u64;
            batch.push((record, created_at, now_rfc3339()));
        }
        let games: Vec<NewGame<'_>> = batch
            .iter()
            .map(|(record, created_at, completed_at)| NewGame {
                record,
                created_at: created_at.clone(),
                completed_at: completed_at.clone(),
            })
            .collect();
        ids.extend(db.insert_games_by(config, "selfplay", Some(&played_by), &games)?);
    }

    Ok(json!({
        "job": "selfplay",
        "config_key": config.key,
        "games": args.games,
        "moves": moves,
        "wins": wins,
        "first_game_id": ids.first(),
        "last_game_id": ids.last(),
        "model": model.as_ref().and(args.model.as_ref()).map(|p| p.display().to_string()),
        "model_sha256": model.as_ref().map(|_| played_by.clone()),
        "epsilon": round6(f64::from(args.epsilon)),
        "seed": seed,
        "db": args.db.display().to_string(),
        "seconds": round6(started.elapsed().as_secs_f64()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &std::path::Path, model: Option<PathBuf>) -> SelfplayArgs {
        SelfplayArgs {
            game: GameArgs {
                config_key: GameConfig::parse("hex6_2p").unwrap(),
                board_type: None,
                num_players: None,
            },
            games: 7,
            db: dir.join("games/hex6_2p.db"),
            model,
            epsilon: 0.1,
            seed: Some(5),
            batch: 3,
        }
    }

    #[test]
    fn plays_and_stores_every_game_with_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path(), Some(dir.path().join("no-model-yet.bin")));
        let summary = run(&a.game.config_key, &a).unwrap();
        assert_eq!(summary["games"], 7);
        assert_eq!(summary["first_game_id"], 1);
        assert_eq!(summary["last_game_id"], 7);
        assert_eq!(summary["model"], Value::Null);
        assert_eq!(summary["model_sha256"], Value::Null);
        let wins = summary["wins"].as_array().unwrap();
        assert_eq!(wins[0].as_u64().unwrap() + wins[1].as_u64().unwrap(), 7);
        let stored = GamesDb::open_existing(&a.db)
            .unwrap()
            .completed_games(&a.game.config_key, 0)
            .unwrap()
            .games;
        assert_eq!(stored.len(), 7);
        let moves: usize = stored.iter().map(|g| g.moves.len()).sum();
        assert_eq!(summary["moves"], moves);
        assert_eq!(played_by(&a.db), ["random"; 7]);
    }

    /// The `model` column of every game in the DB at `db`, in id order.
    fn played_by(db: &std::path::Path) -> Vec<String> {
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut stmt = conn.prepare("SELECT model FROM games ORDER BY id").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn an_existing_model_is_used_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let path = dir.path().join("model.bin");
        std::fs::write(&path, Model::zeros(&config).to_bytes()).unwrap();
        let a = args(dir.path(), Some(path.clone()));
        let summary = run(&config, &a).unwrap();
        assert_eq!(summary["model"], path.display().to_string());
        // Each game names the model by the SHA-256 of its file, as sha256sum writes it.
        let sha = sha256::hex_of(&Model::zeros(&config).to_bytes());
        assert_eq!(summary["model_sha256"], sha.as_str());
        assert_eq!(played_by(&a.db), vec![sha; 7]);

        std::fs::write(&path, b"RRVM\x01\x00").unwrap();
        let err = format!("{:#}", run(&config, &a).unwrap_err());
        assert!(err.starts_with("cannot use --model"), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }
}
