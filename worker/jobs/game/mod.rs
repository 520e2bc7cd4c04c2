//! The reference game of the self-improvement loop, pure and testable without processes.
//!
//! The supervisor's default jobs (`ringrift-worker job selfplay|export|train|gauntlet`) must work out
//! of the box, so the pipeline needs *some* real game with a model that measurably learns. This is
//! it: Hex ([`hex`]) with a linear value model ([`model`]) and numpy-readable training files
//! ([`npz`]), driven by the project's one seeded PRNG (`fastrand::Rng::with_seed`, see
//! docs/DECISIONS.md). Users replace the jobs with their own programs through command templates;
//! nothing else in the supervisor depends on this module.

pub mod hex;
pub mod model;
pub mod npz;

use ringrift::config_key::{Board, ConfigKey, ConfigKeyError};
use thiserror::Error;

use self::hex::{Hex, MoveError};
use self::model::{Model, choose_move};
use fastrand::Rng;

/// A config key the reference game can play (one of [`ringrift::catalog::REFERENCE_CONFIG_KEYS`]),
/// with what the game needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameConfig {
    /// e.g. `hex8_2p`
    pub key: ConfigKey,
    /// Board side: 8 for hex8, 6 for hex6.
    pub size: usize,
}

/// Why a string is not a config key the reference game plays.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GameConfigError {
    /// Not a config key at all.
    #[error(transparent)]
    Key(#[from] ConfigKeyError),
    /// A config key, but not one the reference game plays.
    #[error("unsupported config key \"{0}\" (supported: {list})", list = ringrift::catalog::reference_keys_text())]
    Unsupported(ConfigKey),
}

impl GameConfig {
    /// The game of `key`, or [`GameConfigError::Unsupported`] unless the reference game plays it.
    pub fn for_key(key: ConfigKey) -> Result<GameConfig, GameConfigError> {
        if !ringrift::catalog::is_reference_key(&key) {
            return Err(GameConfigError::Unsupported(key));
        }
        let size = match key.board() {
            Board::Hex8 => 8,
            Board::Hex6 => 6,
            _ => return Err(GameConfigError::Unsupported(key)),
        };
        Ok(GameConfig { key, size })
    }

    /// Parses a config key (`--config-key`, a pipeline key) and checks that the game plays it.
    pub fn parse(key: &str) -> Result<GameConfig, GameConfigError> {
        GameConfig::for_key(key.parse::<ConfigKey>()?)
    }

    /// The board's name: `hex8` for `hex8_2p`.
    pub fn board_type(&self) -> &'static str {
        self.key.board().as_str()
    }

    /// The number of players: 2.
    pub fn num_players(&self) -> u8 {
        self.key.players()
    }

    /// Length of a position's feature vector.
    pub fn num_features(&self) -> usize {
        hex::feature_len(self.size)
    }
}

/// One finished game: the cells played in order (player 1 first) and the winner (1 or 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameRecord {
    pub moves: Vec<u8>,
    pub winner: u8,
}

/// Who plays a seat of a game.
#[derive(Debug, Clone, Copy)]
pub enum Player<'a> {
    /// Uniformly random moves: the bottom of the rating ladder (0 Elo).
    Random,
    /// A fixed reference opponent that knows the game: [`heuristic_move`].
    Heuristic,
    /// A model, choosing by [`choose_move`] with the game's exploration.
    Model(&'a Model),
}

/// The heuristic reference player's move: the one that most shortens its own shortest connection
/// (in empty cells still to fill, [`Hex::distance`]) minus the opponent's, the classic
/// two-distance evaluation of Hex programs one ply deep (a move that wins is the shortest of
/// all; a move that leaves the opponent cut off counts as the opponent being infinitely far).
/// Ties are broken at random, so its games vary. It has no model and never learns: a fixed
/// yardstick across generations.
pub fn heuristic_move(pos: &Hex, rng: &mut Rng) -> usize {
    let me = pos.side_to_move();
    let far = pos.cells() as i64 + 1;
    let mut best = i64::MIN;
    let mut chosen = 0;
    let mut ties = 0;
    for cell in pos.legal_moves() {
        let mut next = *pos;
        next.play(cell).expect("legal move");
        let mine = next.distance(me).map_or(far, i64::from);
        let theirs = next.distance(3 - me).map_or(far, i64::from);
        let value = theirs - mine;
        if value > best {
            (best, chosen, ties) = (value, cell, 1);
        } else if value == best {
            ties += 1;
            if rng.usize(..ties) == 0 {
                chosen = cell;
            }
        }
    }
    chosen
}

/// Plays one game to the end. `players[0]` moves first; `None` plays uniformly at random, a model
/// plays by [`choose_move`] with exploration `epsilon`.
pub fn play_game(
    config: &GameConfig,
    players: [Option<&Model>; 2],
    epsilon: f32,
    rng: &mut Rng,
) -> GameRecord {
    let [a, b] = players.map(|p| p.map_or(Player::Random, Player::Model));
    play_between(config, [a, b], epsilon, rng)
}

/// Plays one game to the end between any two [`Player`]s; `players[0]` moves first.
pub fn play_between(
    config: &GameConfig,
    players: [Player<'_>; 2],
    epsilon: f32,
    rng: &mut Rng,
) -> GameRecord {
    let mut pos = Hex::new(config.size);
    let mut moves = Vec::with_capacity(pos.cells());
    while pos.winner().is_none() {
        let cell = match players[usize::from(pos.side_to_move() - 1)] {
            Player::Random => choose_move(&pos, None, epsilon, rng),
            Player::Heuristic => heuristic_move(&pos, rng),
            Player::Model(m) => choose_move(&pos, Some(m), epsilon, rng),
        };
        pos.play(cell).expect("the policy picks legal moves");
        moves.push(cell as u8);
    }
    GameRecord {
        moves,
        winner: pos.winner().expect("loop ends with a winner"),
    }
}

/// Why a stored game could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplayError {
    #[error("move {number}: {source}")]
    Illegal { number: usize, source: MoveError },
    #[error("the moves end before the game does")]
    Unfinished,
}

/// Replays `moves` and calls `sample(features, outcome)` for every position before a move: the
/// features from the perspective of the player to move, the outcome +1 if that player won, else -1.
/// Returns the winner. Refuses illegal moves and games that do not end exactly at the last move.
pub fn samples(
    config: &GameConfig,
    moves: &[u8],
    mut sample: impl FnMut(&[f32], f32),
) -> Result<u8, ReplayError> {
    // Replay first: outcomes need the winner.
    let mut pos = Hex::new(config.size);
    for (number, &cell) in moves.iter().enumerate() {
        pos.play(usize::from(cell))
            .map_err(|source| ReplayError::Illegal { number, source })?;
    }
    let winner = pos.winner().ok_or(ReplayError::Unfinished)?;
    let mut pos = Hex::new(config.size);
    for &cell in moves {
        let outcome = if pos.side_to_move() == winner {
            1.0
        } else {
            -1.0
        };
        sample(&pos.features(), outcome);
        pos.play(usize::from(cell)).expect("replayed above");
    }
    Ok(winner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_name_their_board() {
        let c = GameConfig::parse("hex8_2p").unwrap();
        assert_eq!((c.board_type(), c.size, c.num_players()), ("hex8", 8, 2));
        assert_eq!(GameConfig::parse("hex6_2p").unwrap().size, 6);
        assert_eq!(GameConfig::parse("hex6_2p").unwrap().num_features(), 75);
        for key in ringrift::catalog::REFERENCE_CONFIG_KEYS {
            assert_eq!(GameConfig::for_key(*key).unwrap().key, *key);
        }
        let err = GameConfig::parse("square8_2p").unwrap_err().to_string();
        assert_eq!(
            err,
            "unsupported config key \"square8_2p\" (supported: hex8_2p, hex6_2p)"
        );
        let err = GameConfig::parse("chess_2p").unwrap_err();
        assert!(matches!(err, GameConfigError::Key(_)), "{err}");
        assert!(err.to_string().contains("'chess_2p' is not a config key"));
    }

    #[test]
    fn games_are_reproducible_from_the_seed() {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let a = play_game(&config, [None, None], 0.0, &mut Rng::with_seed(9));
        let b = play_game(&config, [None, None], 0.0, &mut Rng::with_seed(9));
        assert_eq!(a, b);
        assert!(a.moves.len() >= 11, "a 6×6 game needs at least 11 moves");
    }

    #[test]
    fn samples_label_every_position_with_the_movers_result() {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let record = play_game(&config, [None, None], 0.0, &mut Rng::with_seed(4));
        let mut outcomes = Vec::new();
        let winner = samples(&config, &record.moves, |f, o| {
            assert_eq!(f.len(), config.num_features());
            outcomes.push(o);
        })
        .unwrap();
        assert_eq!(winner, record.winner);
        assert_eq!(outcomes.len(), record.moves.len());
        // Player 1 moves at even indices.
        for (i, o) in outcomes.iter().enumerate() {
            let mover = if i % 2 == 0 { 1 } else { 2 };
            assert_eq!(*o, if mover == winner { 1.0 } else { -1.0 });
        }
        // The last mover won.
        assert_eq!(*outcomes.last().unwrap(), 1.0);
    }

    #[test]
    fn bad_stored_games_are_refused() {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let err = samples(&config, &[3, 3], |_, _| {}).unwrap_err();
        assert_eq!(err.to_string(), "move 1: cell 3 is already occupied");
        assert_eq!(
            samples(&config, &[0, 1], |_, _| {}),
            Err(ReplayError::Unfinished)
        );
        let record = play_game(&config, [None, None], 0.0, &mut Rng::with_seed(2));
        let mut longer = record.moves.clone();
        longer.push(longer[0]);
        assert!(matches!(
            samples(&config, &longer, |_, _| {}),
            Err(ReplayError::Illegal {
                source: MoveError::GameOver,
                ..
            })
        ));
    }

    #[test]
    fn the_heuristic_player_beats_random_play_nearly_always() {
        let config = GameConfig::parse("hex8_2p").unwrap();
        let mut rng = Rng::with_seed(3);
        let wins = (0..100)
            .filter(|g| {
                let seat = g % 2;
                let mut players = [Player::Random, Player::Random];
                players[seat] = Player::Heuristic;
                play_between(&config, players, 0.0, &mut rng).winner == seat as u8 + 1
            })
            .count();
        assert!(wins >= 95, "{wins} of 100");
    }
}
