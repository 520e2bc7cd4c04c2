//! The config key: which board and how many players a piece of the pipeline works on, written
//! `<board>_<players>p` (`hex8_2p`).
//!
//! One type, parsed once at the edge (an event payload, `pipeline.config_keys` in the
//! configuration, a job's `--config-key`), used everywhere after. What the built-in reference jobs
//! can play is a narrower, separate question: see [`crate::catalog::REFERENCE_CONFIG_KEYS`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A board type a config key may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Board {
    /// Hexagonal board of side 8 (`hex8`).
    Hex8,
    /// Hexagonal board of side 6 (`hex6`).
    Hex6,
    /// Square 8×8 board (`square8`).
    Square8,
    /// Square 19×19 board (`square19`).
    Square19,
    /// The full hexagonal board (`hexagonal`).
    Hexagonal,
}

impl Board {
    /// Every board, in the order messages list them.
    pub const ALL: [Board; 5] = [
        Board::Hex8,
        Board::Hex6,
        Board::Square8,
        Board::Square19,
        Board::Hexagonal,
    ];

    /// The board's name as written in a config key: `hex8`, `square19`, ...
    pub const fn as_str(self) -> &'static str {
        match self {
            Board::Hex8 => "hex8",
            Board::Hex6 => "hex6",
            Board::Square8 => "square8",
            Board::Square19 => "square19",
            Board::Hexagonal => "hexagonal",
        }
    }

    /// Number of cells: 36 on hex6, 64 on hex8 and square8, 361 on square19, 469 on the
    /// hexagonal board of radius 12 (3·12·13 + 1).
    pub const fn cells(self) -> usize {
        match self {
            Board::Hex6 => 36,
            Board::Hex8 | Board::Square8 => 64,
            Board::Square19 => 361,
            Board::Hexagonal => 469,
        }
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fewest players a config key may name.
pub const MIN_PLAYERS: u8 = 2;
/// Most players a config key may name.
pub const MAX_PLAYERS: u8 = 4;

/// A valid config key: a [`Board`] and 2–4 players. Displays, serializes and parses as the plain
/// string `hex8_2p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigKey {
    board: Board,
    players: u8,
}

/// A string that is not a config key. Its message names the string and the accepted form:
/// `'chess_2p' is not a config key like "hex8_2p" (board hex8|hex6|square8|square19|hexagonal, 2–4 players)`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "'{0}' is not a config key like \"hex8_2p\" (board hex8|hex6|square8|square19|hexagonal, 2–4 players)"
)]
pub struct ConfigKeyError(pub String);

impl ConfigKey {
    /// Hex on an 8×8 board, two players.
    pub const HEX8_2P: ConfigKey = ConfigKey {
        board: Board::Hex8,
        players: 2,
    };
    /// Hex on a 6×6 board, two players.
    pub const HEX6_2P: ConfigKey = ConfigKey {
        board: Board::Hex6,
        players: 2,
    };

    /// The key of `board` with `players` players, or `None` unless 2 ≤ `players` ≤ 4.
    pub const fn new(board: Board, players: u8) -> Option<ConfigKey> {
        if players >= MIN_PLAYERS && players <= MAX_PLAYERS {
            Some(ConfigKey { board, players })
        } else {
            None
        }
    }

    /// The board: [`Board::Hex8`] for `hex8_2p`.
    pub const fn board(self) -> Board {
        self.board
    }

    /// The number of players: 2 for `hex8_2p`.
    pub const fn players(self) -> u8 {
        self.players
    }
}

impl FromStr for ConfigKey {
    type Err = ConfigKeyError;

    fn from_str(key: &str) -> Result<ConfigKey, ConfigKeyError> {
        let bad = || ConfigKeyError(key.to_string());
        let (board, players) = key.rsplit_once('_').ok_or_else(bad)?;
        let board = Board::ALL
            .into_iter()
            .find(|b| b.as_str() == board)
            .ok_or_else(bad)?;
        // Exactly one digit: "hex8_02p" or "hex8_+2p" would name hex8_2p under another spelling.
        let players = match players.as_bytes() {
            [n @ b'0'..=b'9', b'p'] => n - b'0',
            _ => return Err(bad()),
        };
        ConfigKey::new(board, players).ok_or_else(bad)
    }
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}p", self.board, self.players)
    }
}

impl Serialize for ConfigKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ConfigKey, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_into_board_and_players() {
        let k: ConfigKey = "hex8_2p".parse().unwrap();
        assert_eq!((k.board(), k.players()), (Board::Hex8, 2));
        assert_eq!(k, ConfigKey::HEX8_2P);
        let k: ConfigKey = "square19_4p".parse().unwrap();
        assert_eq!((k.board(), k.players()), (Board::Square19, 4));
        let k: ConfigKey = "hexagonal_3p".parse().unwrap();
        assert_eq!((k.board(), k.players()), (Board::Hexagonal, 3));
    }

    #[test]
    fn every_board_and_player_count_round_trips() {
        for board in Board::ALL {
            for players in MIN_PLAYERS..=MAX_PLAYERS {
                let k = ConfigKey::new(board, players).unwrap();
                assert_eq!(k.to_string().parse::<ConfigKey>(), Ok(k));
            }
        }
    }

    #[test]
    fn bad_keys_are_refused_naming_the_key_and_the_form() {
        for bad in [
            "hex8_5p", "hex8_1p", "hex8", "hex8_2", "hex8_p", "chess_2p", "", "_2p", "hex8_2p ",
            "HEX8_2p", "hex8_+2p", "hex8_02p", "hex8_2p_",
        ] {
            let e = bad.parse::<ConfigKey>().unwrap_err();
            assert_eq!(e, ConfigKeyError(bad.to_string()));
            assert_eq!(
                e.to_string(),
                format!(
                    "'{bad}' is not a config key like \"hex8_2p\" (board hex8|hex6|square8|square19|hexagonal, 2–4 players)"
                )
            );
        }
        assert_eq!(ConfigKey::new(Board::Hex6, 5), None);
        assert_eq!(ConfigKey::new(Board::Hex6, 1), None);
    }

    #[test]
    fn serde_uses_the_plain_string() {
        let json = serde_json::to_string(&ConfigKey::HEX6_2P).unwrap();
        assert_eq!(json, "\"hex6_2p\"");
        let k: ConfigKey = serde_json::from_str("\"square8_3p\"").unwrap();
        assert_eq!(k.to_string(), "square8_3p");
        let e = serde_json::from_str::<ConfigKey>("\"hex8_9p\"").unwrap_err();
        assert!(
            e.to_string().contains("'hex8_9p' is not a config key"),
            "{e}"
        );
        assert!(serde_json::from_str::<ConfigKey>("2").is_err());
    }
}
