//! `ringrift-worker job <kind>`: the built-in reference jobs of the self-improvement loop.
//!
//! selfplay → export → train → gauntlet, each a short-lived command the supervisor runs in its own
//! process group. They are the defaults, so the out-of-the-box configuration plays, learns and
//! evaluates a real (small) game; users swap in their own programs through command templates, and
//! the options here are named after the template placeholders (`{config_key}`, `{db_path}`, ...).
//!
//! Every job prints one JSON line on stdout when it succeeds. Exit codes: 0 ok, 1 failure (one
//! line on stderr says why), 2 usage. Files are written atomically (temporary file, fsync, check,
//! rename), so a reader never sees half a model or half an export.

pub(crate) mod db;
pub(crate) mod db_health;
mod export;
/// The reference workload the jobs play and learn (Hex, the linear model, NPZ, the PRNG): a small
/// library of its own, kept whole even where the jobs use only part of it (its tests use the rest).
#[allow(dead_code)]
pub(crate) mod game;
pub(crate) use export::summary_path as export_summary_path;
mod gauntlet;
mod selfplay;
mod train;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::jobs::game::GameConfig;
use anyhow::{Context, Result};
use ringrift::config_key::ConfigKey;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct JobArgs {
    #[command(subcommand)]
    pub(crate) kind: JobKind,
}

#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub(crate) enum JobKind {
    /// Play games with the current model (or at random) and append them to the games DB
    Selfplay(selfplay::SelfplayArgs),
    /// Turn completed games of the DB into an .npz of training samples
    Export(export::ExportArgs),
    /// Train the value model on an .npz and write a candidate model
    Train(train::TrainArgs),
    /// Play a candidate model against random play, a heuristic player, pinned past generations
    /// and the baseline model; write the results
    Gauntlet(gauntlet::GauntletArgs),
}

/// The game every job works on: `--config-key`, with `--board-type` / `--num-players` accepted as
/// consistency checks so that templates may pass every placeholder.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct GameArgs {
    /// The config key, e.g. hex8_2p or hex6_2p
    #[arg(long, value_name = "KEY", value_parser = GameConfig::parse)]
    pub(crate) config_key: GameConfig,

    /// Must match the config key's board (hex8 for hex8_2p) when given
    #[arg(long, value_name = "BOARD")]
    pub(crate) board_type: Option<String>,

    /// Must match the config key's number of players when given
    #[arg(long, value_name = "N")]
    pub(crate) num_players: Option<u8>,
}

/// A `--board-type` or `--num-players` that contradicts `--config-key`: a usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Mismatch {
    #[error("--board-type {given} does not match --config-key {key} (board {})", key.board())]
    Board { given: String, key: ConfigKey },
    #[error("--num-players {given} does not match --config-key {key} ({} players)", key.players())]
    Players { given: u8, key: ConfigKey },
}

impl GameArgs {
    /// The config, or the usage error of a `--board-type` / `--num-players` that contradicts it.
    fn check(&self) -> Result<&GameConfig, Mismatch> {
        let c = &self.config_key;
        if let Some(board) = &self.board_type
            && board != c.board_type()
        {
            return Err(Mismatch::Board {
                given: board.clone(),
                key: c.key,
            });
        }
        if let Some(n) = self.num_players
            && n != c.num_players()
        {
            return Err(Mismatch::Players {
                given: n,
                key: c.key,
            });
        }
        Ok(c)
    }
}

pub(crate) fn main(args: JobArgs) -> ExitCode {
    let (name, game) = match &args.kind {
        JobKind::Selfplay(a) => ("selfplay", &a.game),
        JobKind::Export(a) => ("export", &a.game),
        JobKind::Train(a) => ("train", &a.game),
        JobKind::Gauntlet(a) => ("gauntlet", &a.game),
    };
    let config = match game.check() {
        Ok(c) => c.clone(),
        Err(usage) => {
            eprintln!("ringrift-worker job {name}: {usage}");
            return ExitCode::from(2);
        }
    };
    let result = match &args.kind {
        JobKind::Selfplay(a) => selfplay::run(&config, a),
        JobKind::Export(a) => export::run(&config, a),
        JobKind::Train(a) => train::run(&config, a),
        JobKind::Gauntlet(a) => gauntlet::run(&config, a),
    };
    match result.and_then(|summary| print_summary(&summary)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringrift-worker job {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_summary(summary: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{summary}").context("cannot write the summary to stdout")?;
    out.flush().context("cannot write the summary to stdout")
}

/// Writes `bytes` to `path` so that `path` is either the old file or the complete new one: a
/// temporary file in the same directory, fsync, `check` on it, rename, fsync of the directory.
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    check: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(file);
        check(&tmp)?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The rename is durable once the directory is; failing to sync it loses nothing written.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A float for a JSON summary, rounded to 6 decimals so that f32 noise does not show.
pub(crate) fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// A seed for runs that did not ask for one: differs per process and per run (fastrand's
/// thread-local generator, seeded afresh in every process).
pub(crate) fn fresh_seed() -> u64 {
    fastrand::u64(..)
}

/// A bad value of a numeric option; clap shows it after "invalid value '...' for '--option'".
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum BadNumber {
    #[error("{0:?} is not a number")]
    NotANumber(String),
    /// `range` as written in the message: `[0, 1]`, `(0, 10]`.
    #[error("{value} is not in {range}")]
    OutOfRange { value: f32, range: &'static str },
}

/// An option's number that must pass `ok`, `range` saying which numbers do (for the message).
pub(crate) fn parse_number_in(
    s: &str,
    ok: impl Fn(f32) -> bool,
    range: &'static str,
) -> Result<f32, BadNumber> {
    let value: f32 = s
        .parse()
        .map_err(|_| BadNumber::NotANumber(s.to_string()))?;
    if ok(value) {
        Ok(value)
    } else {
        Err(BadNumber::OutOfRange { value, range })
    }
}

/// A value of an option that must be a probability.
pub(crate) fn parse_probability(s: &str) -> Result<f32, BadNumber> {
    parse_number_in(s, |p| (0.0..=1.0).contains(&p), "[0, 1]")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        kind: JobKind,
    }

    /// Parses a job's command line, words separated by single spaces.
    fn parse(args: &str) -> Result<JobKind, clap::Error> {
        Cli::try_parse_from(std::iter::once("job").chain(args.split(' '))).map(|c| c.kind)
    }

    #[test]
    fn template_placeholders_parse() {
        let kind = parse(
            "selfplay --config-key hex8_2p --board-type hex8 --num-players 2 --games 10 \
             --db data/games/hex8_2p.db",
        )
        .unwrap();
        let JobKind::Selfplay(a) = kind else {
            panic!("expected selfplay");
        };
        assert_eq!(a.game.check().unwrap().size, 8);
        assert_eq!(a.games, 10);
        assert_eq!(a.epsilon, 0.1);
    }

    #[test]
    fn usage_errors_are_caught_by_clap_or_the_check() {
        for bad in [
            "selfplay --config-key chess_2p --games 1 --db x",
            "selfplay --config-key square8_2p --games 1 --db x",
            "selfplay --config-key hex8_2p --games 0 --db x",
            "gauntlet --config-key hex8_2p --games 2 --output o",
            "selfplay --config-key hex8_2p --games 1 --db x --epsilon 2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let JobKind::Export(a) =
            parse("export --config-key hex8_2p --board-type hex6 --db d --output o").unwrap()
        else {
            panic!("expected export");
        };
        assert_eq!(
            a.game.check().unwrap_err().to_string(),
            "--board-type hex6 does not match --config-key hex8_2p (board hex8)"
        );
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file_and_keeps_the_old_file_on_a_failed_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.bin");
        write_atomic(&path, b"one", |_| Ok(())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let err = write_atomic(&path, b"two", |tmp| {
            assert_eq!(std::fs::read(tmp).unwrap(), b"two");
            anyhow::bail!("check failed")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "check failed");
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
    }

    #[test]
    fn fresh_seeds_differ() {
        assert_ne!(fresh_seed(), fresh_seed());
    }
}
