//! `job gauntlet`: how good is a candidate model? Plays it against uniform random play, a fixed
//! heuristic player, the pinned past generations in `--references` and, when there is one, the
//! baseline (canonical) model, alternating who moves first, and writes the win rates for the
//! promotion step and the rating ladder to read.
//!
//! With `--sprt`, the match against the baseline is a sequential probability ratio test
//! (`ringrift::sprt`): pairs of games until the test accepts or rejects, at most `--games`; the
//! results record its parameters, log-likelihood ratio and `result` (`accept`, `reject`, or
//! `inconclusive` when the games ran out), which the promotion gate reads.
//!
//! Both models play greedily with a small ε so that games between two deterministic players are
//! not all the same game; a fixed default seed makes a gauntlet repeatable. The candidate must
//! load (a corrupt candidate is an error); a baseline that is missing or does not load is skipped
//! and the reason recorded, because the first round of the loop has no canonical model yet.

use std::path::PathBuf;
use std::time::Instant;

use crate::jobs::game::model::Model;
use crate::jobs::game::{GameConfig, Player, play_between};
use anyhow::{Context, Result};
use fastrand::Rng;
use ringrift::sprt::{Decision, Sprt};
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

    /// Play the baseline as a sequential probability ratio test instead of a fixed match:
    /// pairs of games (one per seat) until the test accepts (the candidate is at least ELO1
    /// stronger) or rejects (at most ELO0), at most --games games; ALPHA and BETA are its error
    /// rates (e.g. 0,50,0.05,0.05); `off`: a fixed match of --games games
    #[arg(long, value_name = "ELO0,ELO1,ALPHA,BETA", default_value = "off", value_parser = parse_sprt)]
    pub(crate) sprt: SprtArg,

    /// Pinned past generations to play as fixed reference opponents: every `*.bin` model in this
    /// directory (missing or empty: none; one that does not load is skipped and named)
    #[arg(long, value_name = "DIR")]
    pub(crate) references: Option<PathBuf>,

    /// Games against each fixed reference opponent (the heuristic player and each pinned
    /// generation)
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) reference_games: u32,
}

/// The pinned generations in `dir`, by file name: (path, SHA-256, model), and the reasons the
/// unusable ones were skipped.
fn references(
    dir: Option<&std::path::Path>,
    config: &GameConfig,
) -> (Vec<(PathBuf, String, Model)>, Vec<String>) {
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    let Some(entries) = dir.and_then(|d| std::fs::read_dir(d).ok()) else {
        return (found, skipped);
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    paths.sort();
    for path in paths {
        let loaded = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                Model::from_bytes(&bytes, config)
                    .map(|m| (crate::pipeline::sha256::hex_of(&bytes), m))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((sha, model)) => found.push((path, sha, model)),
            Err(e) => skipped.push(format!("reference {} skipped: {e}", path.display())),
        }
    }
    (found, skipped)
}

/// `--sprt`: the test's parameters, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SprtArg(pub(crate) Option<Sprt>);

fn parse_sprt(s: &str) -> Result<SprtArg, String> {
    if s == "off" {
        Ok(SprtArg(None))
    } else {
        Sprt::parse(s).map(|t| SprtArg(Some(t)))
    }
}

/// A match of `candidate` against an opponent: games played, games won, and wins per seat (the
/// candidate moves first in the even-numbered games).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Match {
    games: u32,
    wins: u32,
    wins_by_seat: [u32; 2],
}

/// Plays up to `games` games, stopping after a pair of games once `stop` says so.
fn play_match(
    config: &GameConfig,
    candidate: &Model,
    opponent: Player<'_>,
    games: u32,
    epsilon: f32,
    rng: &mut Rng,
    stop: impl Fn(&Match) -> bool,
) -> Match {
    let mut m = Match {
        games: 0,
        wins: 0,
        wins_by_seat: [0; 2],
    };
    for g in 0..games {
        let seat = (g % 2) as usize;
        let mut players = [opponent, opponent];
        players[seat] = Player::Model(candidate);
        let record = play_between(config, players, epsilon, rng);
        m.games += 1;
        if usize::from(record.winner) == seat + 1 {
            m.wins += 1;
            m.wins_by_seat[seat] += 1;
        }
        if seat == 1 && stop(&m) {
            break;
        }
    }
    m
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
    let random = play_match(
        config,
        &candidate,
        Player::Random,
        args.games,
        args.epsilon,
        &mut rng,
        |_| false,
    );
    let heuristic = play_match(
        config,
        &candidate,
        Player::Heuristic,
        args.reference_games,
        args.epsilon,
        &mut rng,
        |_| false,
    );
    let (pinned, skipped_references) = references(args.references.as_deref(), config);
    for why in &skipped_references {
        eprintln!("ringrift-worker job gauntlet: {why}");
    }
    let vs_pinned: Vec<Value> = pinned
        .iter()
        .map(|(path, sha, model)| {
            let m = play_match(
                config,
                &candidate,
                Player::Model(model),
                args.reference_games,
                args.epsilon,
                &mut rng,
                |_| false,
            );
            json!({
                "model": path.display().to_string(), "sha256": sha,
                "games": m.games, "wins": m.wins,
                "win_rate": round6(f64::from(m.wins) / f64::from(m.games.max(1))),
            })
        })
        .collect();
    // The built-in game has no draws: a game not won is lost.
    let decision = |m: &Match| {
        args.sprt
            .0
            .map(|t| t.decide(u64::from(m.wins), 0, u64::from(m.games - m.wins)))
    };
    let vs_baseline = baseline.as_ref().map(|b| {
        play_match(
            config,
            &candidate,
            Player::Model(b),
            args.games,
            args.epsilon,
            &mut rng,
            |m| decision(m).is_some_and(|d| d != Decision::Continue),
        )
    });
    let sprt = args.sprt.0.zip(vs_baseline).map(|(t, m)| {
        let (lower, upper) = t.bounds();
        let result = match t.decide(u64::from(m.wins), 0, u64::from(m.games - m.wins)) {
            // Out of games with neither bound reached.
            Decision::Continue => "inconclusive",
            d => d.as_str(),
        };
        json!({
            "elo0": t.elo0, "elo1": t.elo1, "alpha": t.alpha, "beta": t.beta,
            "llr": round6(t.llr(u64::from(m.wins), 0, u64::from(m.games - m.wins))),
            "lower": round6(lower), "upper": round6(upper),
            "result": result,
        })
    });
    let rate = |m: &Match| round6(f64::from(m.wins) / f64::from(m.games.max(1)));
    let result = json!({
        "job": "gauntlet",
        "config_key": config.key,
        "candidate": args.candidate.display().to_string(),
        "baseline": baseline.as_ref().and(args.baseline.as_ref()).map(|p| p.display().to_string()),
        "baseline_error": baseline_error,
        "games_vs_random": random.games,
        "wins_vs_random": random.wins,
        "wins_vs_random_by_seat": random.wins_by_seat,
        "win_rate_vs_random": rate(&random),
        "games_vs_baseline": vs_baseline.map_or(0, |m| m.games),
        "wins_vs_baseline": vs_baseline.map(|m| m.wins),
        "wins_vs_baseline_by_seat": vs_baseline.map(|m| m.wins_by_seat),
        "win_rate_vs_baseline": vs_baseline.as_ref().map(rate),
        "games_vs_heuristic": heuristic.games,
        "wins_vs_heuristic": heuristic.wins,
        "win_rate_vs_heuristic": rate(&heuristic),
        "references": vs_pinned,
        "references_skipped": skipped_references,
        "sprt": sprt,
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
            sprt: SprtArg(None),
            references: None,
            reference_games: 200,
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
