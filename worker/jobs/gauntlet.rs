//! `job gauntlet`: how good is a candidate model? Plays it against uniform random play and, when
//! there is one, against the baseline (canonical) model, alternating who moves first, and writes
//! the win rates for the promotion step to read.
//!
//! Both models play greedily with a small ε so that games between two deterministic players are
//! not all the same game; a fixed default seed makes a gauntlet repeatable. The candidate must
//! load (a corrupt candidate is an error); a baseline that is missing or does not load is skipped
//! and the reason recorded, because the first round of the loop has no canonical model yet.

use std::path::PathBuf;
use std::time::Instant;

use crate::jobs::game::model::Model;
use crate::jobs::game::{GameConfig, play_game};
use anyhow::{Context, Result};
use fastrand::Rng;
use serde_json::{Value, json};

use super::{GameArgs, parse_probability, round6, write_atomic};

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct GauntletArgs {
    #[command(flatten)]
    pub(crate) game: GameArgs,

    /// The model to evaluate
    #[arg(long, value_name = "MODEL")]
    pub(crate) candidate: PathBuf,

    /// The model to beat (the canonical one); skipped if missing or unloadable
    #[arg(long, value_name = "MODEL")]
    pub(crate) baseline: Option<PathBuf>,

    /// Games against each opponent
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) games: u32,

    /// Where to write the results JSON (replaced atomically)
    #[arg(long, value_name = "JSON")]
    pub(crate) output: PathBuf,

    /// Exploration of both models
    #[arg(long, value_name = "P", default_value = "0.05", value_parser = parse_probability)]
    pub(crate) epsilon: f32,

    /// Seed of the games
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub(crate) seed: u64,
}

/// Games won by `candidate` against `opponent` (`None`: uniform random), candidate first in the
/// even-numbered games.
fn play_match(
    config: &GameConfig,
    candidate: &Model,
    opponent: Option<&Model>,
    games: u32,
    epsilon: f32,
    rng: &mut Rng,
) -> (u32, [u32; 2]) {
    let mut wins = 0;
    let mut wins_by_seat = [0; 2];
    for g in 0..games {
        let seat = (g % 2) as usize;
        let mut players = [opponent, opponent];
        players[seat] = Some(candidate);
        let record = play_game(config, players, epsilon, rng);
        if usize::from(record.winner) == seat + 1 {
            wins += 1;
            wins_by_seat[seat] += 1;
        }
    }
    (wins, wins_by_seat)
}

pub(crate) fn run(config: &GameConfig, args: &GauntletArgs) -> Result<Value> {
    let started = Instant::now();
    let candidate = Model::load(&args.candidate, config)
        .with_context(|| format!("cannot use --candidate {}", args.candidate.display()))?;
    let (baseline, baseline_error) = match &args.baseline {
        None => (None, None),
        Some(path) => match Model::load(path, config) {
            Ok(model) => (Some(model), None),
            Err(e) => {
                let reason = format!("baseline skipped: {e}");
                eprintln!("ringrift-worker job gauntlet: {reason}");
                (None, Some(reason))
            }
        },
    };
    let mut rng = Rng::with_seed(args.seed);
    let (wins_random, seats_random) =
        play_match(config, &candidate, None, args.games, args.epsilon, &mut rng);
    let vs_baseline = baseline.as_ref().map(|b| {
        play_match(
            config,
            &candidate,
            Some(b),
            args.games,
            args.epsilon,
            &mut rng,
        )
    });
    let rate = |wins: u32| round6(f64::from(wins) / f64::from(args.games));
    let result = json!({
        "job": "gauntlet",
        "config_key": config.key,
        "candidate": args.candidate.display().to_string(),
        "baseline": baseline.as_ref().and(args.baseline.as_ref()).map(|p| p.display().to_string()),
        "baseline_error": baseline_error,
        "games_vs_random": args.games,
        "wins_vs_random": wins_random,
        "wins_vs_random_by_seat": seats_random,
        "win_rate_vs_random": rate(wins_random),
        "games_vs_baseline": if vs_baseline.is_some() { args.games } else { 0 },
        "wins_vs_baseline": vs_baseline.map(|(w, _)| w),
        "wins_vs_baseline_by_seat": vs_baseline.map(|(_, s)| s),
        "win_rate_vs_baseline": vs_baseline.map(|(w, _)| rate(w)),
        "epsilon": round6(f64::from(args.epsilon)),
        "seed": args.seed,
        "seconds": round6(started.elapsed().as_secs_f64()),
    });
    let mut text = serde_json::to_vec_pretty(&result).context("cannot encode the results")?;
    text.push(b'\n');
    write_atomic(&args.output, &text, |tmp| {
        let back =
            std::fs::read(tmp).with_context(|| format!("cannot read back {}", tmp.display()))?;
        serde_json::from_slice::<Value>(&back).context("the results written do not parse back")?;
        Ok(())
    })?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dir: &std::path::Path) -> (GameConfig, GauntletArgs) {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let candidate = dir.join("candidate.bin");
        std::fs::write(&candidate, Model::zeros(&config).to_bytes()).unwrap();
        let args = GauntletArgs {
            game: GameArgs {
                config_key: config.clone(),
                board_type: None,
                num_players: None,
            },
            candidate,
            baseline: None,
            games: 10,
            output: dir.join("eval/result.json"),
            epsilon: 0.05,
            seed: 3,
        };
        (config, args)
    }

    #[test]
    fn without_a_baseline_only_random_is_played_and_the_file_matches_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let (config, args) = setup(dir.path());
        let result = run(&config, &args).unwrap();
        assert_eq!(result["games_vs_random"], 10);
        assert_eq!(result["games_vs_baseline"], 0);
        assert_eq!(result["win_rate_vs_baseline"], Value::Null);
        let rate = result["win_rate_vs_random"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rate));
        let file: Value = serde_json::from_slice(&std::fs::read(&args.output).unwrap()).unwrap();
        assert_eq!(file, result);
        // Same seed, same games.
        let again = run(&config, &args).unwrap();
        assert_eq!(again["wins_vs_random"], result["wins_vs_random"]);
    }

    #[test]
    fn a_loadable_baseline_is_played_and_a_broken_one_is_skipped_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut args) = setup(dir.path());
        args.baseline = Some(args.candidate.clone());
        let result = run(&config, &args).unwrap();
        assert_eq!(result["games_vs_baseline"], 10);
        let w = result["wins_vs_baseline"].as_u64().unwrap();
        assert_eq!(
            result["win_rate_vs_baseline"].as_f64().unwrap(),
            w as f64 / 10.0
        );

        let broken = dir.path().join("canonical.bin");
        std::fs::write(&broken, b"not a model").unwrap();
        args.baseline = Some(broken);
        let result = run(&config, &args).unwrap();
        assert_eq!(result["games_vs_baseline"], 0);
        assert_eq!(result["baseline"], Value::Null);
        assert!(
            result["baseline_error"]
                .as_str()
                .unwrap()
                .contains("bad magic")
        );
    }

    #[test]
    fn a_corrupt_candidate_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (config, args) = setup(dir.path());
        let mut bytes = std::fs::read(&args.candidate).unwrap();
        let last = bytes.len() - 9;
        bytes[last] ^= 0xFF;
        std::fs::write(&args.candidate, bytes).unwrap();
        let err = format!("{:#}", run(&config, &args).unwrap_err());
        assert!(err.starts_with("cannot use --candidate"), "{err}");
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(!args.output.exists());
    }
}
