//! `job train`: fits the value model to an exported `.npz` and writes a candidate model.
//!
//! Starts from `--init` (the current model, when it exists) or from zeros, runs SGD, and writes the
//! candidate atomically after loading it back. The input is validated end to end (checksums,
//! shapes, config key, feature count), so a truncated export fails here with a clear message.

use std::path::PathBuf;
use std::time::Instant;

use crate::jobs::game::GameConfig;
use crate::jobs::game::model::{Model, TrainOptions};
use crate::jobs::game::npz::Dataset;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{GameArgs, round6, write_atomic};

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) game: GameArgs,

    /// The .npz written by export
    #[arg(long, value_name = "NPZ")]
    pub(crate) input: PathBuf,

    /// Where to write the candidate model (replaced atomically)
    #[arg(long, value_name = "MODEL")]
    pub(crate) output: PathBuf,

    /// Start from this model if the file exists (from zeros otherwise)
    #[arg(long, value_name = "MODEL")]
    pub(crate) init: Option<PathBuf>,

    /// Passes over the samples
    #[arg(long, value_name = "E", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) epochs: u32,

    /// SGD learning rate
    #[arg(long, value_name = "LR", default_value = "0.01", value_parser = parse_lr)]
    pub(crate) lr: f32,

    /// Seed of the sample shuffle
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub(crate) seed: u64,
}

fn parse_lr(s: &str) -> Result<f32, super::BadNumber> {
    super::parse_number_in(s, |lr| lr > 0.0 && lr <= 10.0, "(0, 10]")
}

pub(crate) fn run(config: &GameConfig, args: &TrainArgs) -> Result<Value> {
    let started = Instant::now();
    let bytes = std::fs::read(&args.input)
        .with_context(|| format!("cannot read --input {}", args.input.display()))?;
    let data = Dataset::decode(&bytes)
        .with_context(|| format!("--input {} is not a usable export", args.input.display()))?;
    ensure!(
        data.config_key == config.key.to_string(),
        "--input {} holds {} samples, not {}",
        args.input.display(),
        data.config_key,
        config.key
    );
    ensure!(
        data.num_features == config.num_features(),
        "--input {} has {} features per sample, {} needs {}",
        args.input.display(),
        data.num_features,
        config.key,
        config.num_features()
    );
    if data.is_empty() {
        bail!(
            "--input {} has no samples to train on",
            args.input.display()
        );
    }
    let (mut model, init) = match &args.init {
        Some(path) if path.exists() => (
            Model::load(path, config)
                .with_context(|| format!("cannot use --init {}", path.display()))?,
            Some(path.display().to_string()),
        ),
        _ => (Model::zeros(config), None),
    };
    let loss_before = model.loss(&data.states, &data.outcomes);
    let opts = TrainOptions {
        epochs: args.epochs as usize,
        learning_rate: args.lr,
        seed: args.seed,
    };
    model.train(&data.states, &data.outcomes, &opts);
    let loss_after = model.loss(&data.states, &data.outcomes);
    ensure!(
        loss_after.is_finite() && model.weights().iter().all(|w| w.is_finite()),
        "training diverged (loss {loss_after}); lower --lr"
    );
    write_atomic(&args.output, &model.to_bytes(), |tmp| {
        let back = Model::load(tmp, config).context("the candidate written does not load back")?;
        ensure!(
            back == model,
            "the candidate read back differs from what was written"
        );
        Ok(())
    })?;
    Ok(json!({
        "job": "train",
        "config_key": config.key,
        "samples": data.len(),
        "epochs": args.epochs,
        "lr": round6(f64::from(args.lr)),
        "loss_before": round6(f64::from(loss_before)),
        "loss_after": round6(f64::from(loss_after)),
        "init": init,
        "input": args.input.display().to_string(),
        "output": args.output.display().to_string(),
        "seconds": round6(started.elapsed().as_secs_f64()),
    }))
}

#[cfg(test)]
mod tests {
    use crate::jobs::game::{play_game, samples};
    use fastrand::Rng;

    use super::*;

    fn setup(dir: &std::path::Path) -> (GameConfig, TrainArgs) {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let mut data = Dataset::new(&config.key.to_string(), config.num_features());
        let mut rng = Rng::with_seed(4);
        for id in 1..=100 {
            let record = play_game(&config, [None, None], 0.0, &mut rng);
            samples(&config, &record.moves, |f, o| data.push(f, o, id)).unwrap();
        }
        let input = dir.join("in.npz");
        std::fs::write(&input, data.encode().unwrap()).unwrap();
        let args = TrainArgs {
            game: GameArgs {
                config_key: config.clone(),
                board_type: None,
                num_players: None,
            },
            input,
            output: dir.join("models/candidate.bin"),
            init: Some(dir.join("models/canonical.bin")),
            epochs: 5,
            lr: 0.01,
            seed: 1,
        };
        (config, args)
    }

    #[test]
    fn training_lowers_the_loss_and_writes_a_loadable_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut args) = setup(dir.path());
        let summary = run(&config, &args).unwrap();
        assert_eq!(summary["init"], Value::Null, "no canonical model yet");
        let before = summary["loss_before"].as_f64().unwrap();
        let after = summary["loss_after"].as_f64().unwrap();
        assert!(
            (before - std::f64::consts::LN_2).abs() < 1e-4 && after < before - 0.02,
            "{summary}"
        );
        let first = Model::load(&args.output, &config).unwrap();

        // From an existing model, training starts where it left off.
        std::fs::copy(&args.output, args.init.as_ref().unwrap()).unwrap();
        let summary = run(&config, &args).unwrap();
        assert!((summary["loss_before"].as_f64().unwrap() - after).abs() < 1e-5);
        assert_ne!(Model::load(&args.output, &config).unwrap(), first);

        args.input = dir.path().join("missing.npz");
        let err = format!("{:#}", run(&config, &args).unwrap_err());
        assert!(err.starts_with("cannot read --input"), "{err}");
    }

    #[test]
    fn a_truncated_or_foreign_input_is_a_clear_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, args) = setup(dir.path());
        let bytes = std::fs::read(&args.input).unwrap();
        std::fs::write(&args.input, &bytes[..bytes.len() / 2]).unwrap();
        let config = args.game.config_key.clone();
        let err = format!("{:#}", run(&config, &args).unwrap_err());
        assert!(
            err.contains("is not a usable export") && err.contains("truncated"),
            "{err}"
        );
        assert!(!args.output.exists());

        std::fs::write(&args.input, &bytes).unwrap();
        let hex8 = GameConfig::parse("hex8_2p").unwrap();
        let err = format!("{:#}", run(&hex8, &args).unwrap_err());
        assert!(err.contains("holds hex6_2p samples, not hex8_2p"), "{err}");
    }
}
