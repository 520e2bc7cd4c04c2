//! The games DB (`data/games/<config_key>.db`): what selfplay writes and export reads.
//!
//! SQLite in WAL mode with a busy timeout, so an export can read while a selfplay job appends, and
//! one transaction per batch of games, so a job killed mid-run leaves whole games only. Every game
//! read back is checked against what the schema means ([`check_game`]) and replayed against the
//! rules before it is exported: a damaged row is skipped and reported with the game's id and the
//! reason, never a silent bad sample and never a failed export. A file that is not a usable games
//! DB at all is [`super::db_health`]'s business (moved aside, a fresh one started).
//!
//! Schema (moves are 1-based per game; cell = row * side + column):
//!
//! ```sql
//! games(id INTEGER PRIMARY KEY AUTOINCREMENT, config_key TEXT, board_type TEXT, num_players INTEGER,
//!       created_at TEXT, completed_at TEXT, status TEXT ('completed'|'aborted'), winner INTEGER,
//!       total_moves INTEGER, source TEXT, model TEXT)
//! moves(game_id INTEGER REFERENCES games(id), move_number INTEGER, player INTEGER, cell INTEGER,
//!       PRIMARY KEY (game_id, move_number))
//! ```
//!
//! `model` says which model played the game: the SHA-256 (64 lower-case hex digits) of the model
//! file the selfplay job played with, `random` when it had none (the loop's first round), NULL
//! when unknown (games written before the column existed, or by a selfplay job that does not
//! say). The per-key view's `model_sha256` (`status --json`, `GET /pipeline`) and `sha256sum
//! models/canonical_<key>.bin` give the canonical model's, to join on. A DB written before the
//! column existed gains it (NULL for its games) when it is next opened ([`migrate`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::jobs::game::{GameConfig, GameRecord};
use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, params};

/// Stores one completed game: config_key, board_type, num_players, created_at, completed_at,
/// winner, total_moves, source, model (`?1`..`?9`).
pub(crate) const INSERT_GAME: &str = "INSERT INTO games (config_key, board_type, num_players,
    created_at, completed_at, status, winner, total_moves, source, model)
    VALUES (?1, ?2, ?3, ?4, ?5, 'completed', ?6, ?7, ?8, ?9)";

/// What the `model` column says of a game played without a model (uniformly random play).
pub(crate) const RANDOM_MODEL: &str = "random";

/// Stores one move: game_id, move_number, player, cell (`?1`..`?4`).
pub(crate) const INSERT_MOVE: &str =
    "INSERT INTO moves (game_id, move_number, player, cell) VALUES (?1, ?2, ?3, ?4)";

/// How long a writer waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS games (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_key TEXT NOT NULL,
    board_type TEXT NOT NULL,
    num_players INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    completed_at TEXT,
    status TEXT NOT NULL CHECK (status IN ('completed', 'aborted')),
    winner INTEGER,
    total_moves INTEGER NOT NULL,
    source TEXT NOT NULL,
    model TEXT
);
CREATE INDEX IF NOT EXISTS games_by_config ON games (config_key, status, id);
CREATE TABLE IF NOT EXISTS moves (
    game_id INTEGER NOT NULL REFERENCES games (id) ON DELETE CASCADE,
    move_number INTEGER NOT NULL,
    player INTEGER NOT NULL,
    cell INTEGER NOT NULL,
    PRIMARY KEY (game_id, move_number)
) WITHOUT ROWID;
";

/// A finished game to store.
pub(crate) struct NewGame<'a> {
    pub record: &'a GameRecord,
    pub created_at: String,
    pub completed_at: String,
}

/// A completed game read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredGame {
    pub id: i64,
    pub winner: u8,
    pub moves: Vec<u8>,
}

/// What [`GamesDb::completed_games`] read: the usable games, the ones left out and why, and the
/// highest id read (usable or not), from which the next read may continue.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GamesRead {
    pub games: Vec<StoredGame>,
    pub skipped: Vec<Skipped>,
    pub last_id: Option<i64>,
}

/// A game left out of an export, and why (`winner 7 is not a player of this 2-player game`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub id: i64,
    pub reason: String,
}

/// An integer column as stored: `Ok(None)` for NULL, `Err(kind)` for a value of another type
/// (SQLite lets any column hold any type).
type Int = Result<Option<i64>, &'static str>;

fn int(v: rusqlite::types::ValueRef<'_>) -> Int {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Integer(i) => Ok(Some(i)),
        ValueRef::Null => Ok(None),
        ValueRef::Real(_) => Err("a real number"),
        ValueRef::Text(_) => Err("text"),
        ValueRef::Blob(_) => Err("a blob"),
    }
}

/// One game's rows as read, before their meaning is checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawGame {
    pub id: i64,
    pub num_players: Int,
    pub winner: Int,
    pub total_moves: Int,
    pub moves: Vec<RawMove>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RawMove {
    pub number: Int,
    pub player: Int,
    pub cell: Int,
}

/// Checks the rows of one completed game against what the schema means for `config`: the game
/// has `config.num_players` players and one of them won; `total_moves` moves numbered 1, 2, ...
/// with no gap; players taking turns (player 1 first); every cell on the board
/// (`0 ≤ cell < size²`). The reason names the first broken rule. Whether the moves are legal and
/// the winner right is for the caller's replay.
pub(crate) fn check_game(config: &GameConfig, raw: &RawGame) -> Result<StoredGame, BadGame> {
    let want = |what: &str, v: Int| -> Result<i64, BadGame> {
        match v {
            Ok(Some(i)) => Ok(i),
            Ok(None) => Err(BadGame::Null(what.to_string())),
            Err(kind) => Err(BadGame::NotInteger {
                what: what.to_string(),
                kind,
            }),
        }
    };
    let players = i64::from(config.num_players());
    let n = want("num_players", raw.num_players)?;
    if n != players {
        return Err(BadGame::Players {
            found: n,
            key: config.key,
            players,
        });
    }
    let winner = want("winner", raw.winner)?;
    if !(1..=players).contains(&winner) {
        return Err(BadGame::Winner { winner, players });
    }
    let total = want("total_moves", raw.total_moves)?;
    if total != raw.moves.len() as i64 {
        return Err(BadGame::TotalMoves {
            total,
            stored: raw.moves.len(),
        });
    }
    let cells = (config.size * config.size) as i64;
    let mut moves = Vec::with_capacity(raw.moves.len());
    for (i, m) in raw.moves.iter().enumerate() {
        let expected = i as i64 + 1;
        let number = want("a move_number", m.number)?;
        if number != expected {
            return Err(BadGame::MissingMove { expected, number });
        }
        let player = want(&format!("the player of move {number}"), m.player)?;
        let expected_player = (number - 1) % players + 1;
        if player != expected_player {
            return Err(BadGame::WrongPlayer {
                number,
                player,
                expected: expected_player,
            });
        }
        let cell = want(&format!("the cell of move {number}"), m.cell)?;
        if !(0..cells).contains(&cell) {
            return Err(BadGame::OffBoard {
                number,
                cell,
                cells,
            });
        }
        moves.push(u8::try_from(cell).map_err(|_| BadGame::CellTooBig { number, cell })?);
    }
    Ok(StoredGame {
        id: raw.id,
        winner: winner as u8,
        moves,
    })
}

/// Why a stored game breaks what the schema means (see [`check_game`]): the first broken rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadGame {
    #[error("{0} is NULL")]
    Null(String),
    #[error("{what} is {kind}, not an integer")]
    NotInteger { what: String, kind: &'static str },
    #[error("num_players is {found}, but {key} games have {players}")]
    Players {
        found: i64,
        key: ringrift::config_key::ConfigKey,
        players: i64,
    },
    #[error("winner {winner} is not a player of this {players}-player game")]
    Winner { winner: i64, players: i64 },
    #[error("total_moves is {total} but {stored} moves are stored")]
    TotalMoves { total: i64, stored: usize },
    #[error("move {expected} is missing (found move {number})")]
    MissingMove { expected: i64, number: i64 },
    #[error("move {number} is by player {player}, expected {expected}")]
    WrongPlayer {
        number: i64,
        player: i64,
        expected: i64,
    },
    #[error("move {number} is on cell {cell}, off the board (0..{cells})")]
    OffBoard { number: i64, cell: i64, cells: i64 },
    #[error("move {number}: cell {cell} does not fit a byte")]
    CellTooBig { number: i64, cell: i64 },
}

/// Whether the games table of `conn` has the `model` column (a DB written before it may not).
pub(crate) fn has_model_column(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare("SELECT 1 FROM pragma_table_info('games') WHERE name = 'model'")?;
    stmt.exists([])
}

/// Brings a games DB written by an earlier version up to today's schema: adds the `model` column
/// (NULL for the games already there) when it is missing. Two writers migrating at once are fine:
/// the one that loses the race finds the column there.
pub(crate) fn migrate(conn: &Connection, path: &Path) -> Result<()> {
    if has_model_column(conn)? {
        return Ok(());
    }
    match conn.execute_batch("ALTER TABLE games ADD COLUMN model TEXT") {
        Ok(()) => Ok(()),
        Err(_) if has_model_column(conn)? => Ok(()),
        Err(e) => Err(e)
            .with_context(|| format!("cannot add the model column to games db {}", path.display())),
    }
}

/// Checks that `conn` (the DB at `path`, named `what` in messages) has the games schema's
/// tables: an error says it is unreadable or not a games DB.
pub(crate) fn check_games_tables(conn: &Connection, what: &str, path: &Path) -> Result<()> {
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('games', 'moves')",
            [],
            |row| row.get(0),
        )
        .with_context(|| format!("{what} {} is not readable", path.display()))?;
    if tables != 2 {
        bail!(
            "{what} {} has no games/moves tables (not a games db?)",
            path.display()
        );
    }
    Ok(())
}

pub(crate) struct GamesDb {
    conn: Connection,
    path: PathBuf,
}

impl GamesDb {
    /// Opens the DB at `path`, creating it (and its directory) and the schema if needed, and
    /// bringing an older one up to today's schema ([`migrate`]).
    pub(crate) fn create(path: &Path) -> Result<GamesDb> {
        let conn = ringrift::sqlite::create(path, "games db", BUSY_TIMEOUT)?;
        let db = GamesDb::with_foreign_keys(conn, path)?;
        db.conn
            .execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the schema of games db {}", path.display()))?;
        migrate(&db.conn, path)?;
        Ok(db)
    }

    /// Opens an existing DB; refuses a missing file or one without the games schema, and brings
    /// an older one up to today's schema ([`migrate`]).
    pub(crate) fn open_existing(path: &Path) -> Result<GamesDb> {
        if !path.is_file() {
            bail!("games db {} does not exist", path.display());
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open games db {}", path.display()))?;
        let conn = ringrift::sqlite::configure(conn, path, "games db", BUSY_TIMEOUT)?;
        let db = GamesDb::with_foreign_keys(conn, path)?;
        check_games_tables(&db.conn, "games db", path)?;
        migrate(&db.conn, path)?;
        Ok(db)
    }

    /// WAL, busy timeout, foreign keys. The first statement is also where SQLite notices a file
    /// that is not a database.
    fn with_foreign_keys(conn: Connection, path: &Path) -> Result<GamesDb> {
        conn.execute_batch("PRAGMA foreign_keys = ON;")
            .context("cannot configure the games db")?;
        Ok(GamesDb {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Stores `games` as completed games of `config` in one transaction, played by an unknown
    /// model (`model` NULL); returns their ids. For tests, which do not care who played.
    #[cfg(test)]
    pub(crate) fn insert_games(
        &mut self,
        config: &GameConfig,
        source: &str,
        games: &[NewGame<'_>],
    ) -> Result<Vec<i64>> {
        self.insert_games_by(config, source, None, games)
    }

    /// Stores `games` as completed games of `config` played by `model` (what the `model` column
    /// records: a model file's SHA-256, or [`RANDOM_MODEL`]) in one transaction; returns their
    /// ids.
    pub(crate) fn insert_games_by(
        &mut self,
        config: &GameConfig,
        source: &str,
        model: Option<&str>,
        games: &[NewGame<'_>],
    ) -> Result<Vec<i64>> {
        let path = self.path.display().to_string();
        let tx = self
            .conn
            .transaction()
            .with_context(|| format!("cannot start a transaction on games db {path}"))?;
        let mut ids = Vec::with_capacity(games.len());
        {
            let mut game_stmt = tx.prepare(INSERT_GAME)?;
            let mut move_stmt = tx.prepare(INSERT_MOVE)?;
            for game in games {
                game_stmt.execute(params![
                    config.key.to_string(),
                    config.board_type(),
                    config.num_players(),
                    game.created_at,
                    game.completed_at,
                    game.record.winner,
                    game.record.moves.len() as i64,
                    source,
                    model,
                ])?;
                let id = tx.last_insert_rowid();
                for (i, &cell) in game.record.moves.iter().enumerate() {
                    let player = if i % 2 == 0 { 1 } else { 2 };
                    move_stmt.execute(params![id, i as i64 + 1, player, cell])?;
                }
                ids.push(id);
            }
        }
        tx.commit()
            .with_context(|| format!("cannot commit games to games db {path}"))?;
        Ok(ids)
    }

    /// The highest game id of any key and status (`None`: no game).
    pub(crate) fn max_id(&self) -> Result<Option<i64>> {
        self.conn
            .query_row("SELECT MAX(id) FROM games", [], |r| r.get(0))
            .with_context(|| format!("cannot read games db {}", self.path.display()))
    }

    /// The id of the oldest of the newest `window` completed games of `config` (`None` when there
    /// are fewer: every game is in the window).
    pub(crate) fn window_start(&self, config: &GameConfig, window: u64) -> Result<Option<i64>> {
        use rusqlite::OptionalExtension;
        self.conn
            .query_row(
                "SELECT id FROM games WHERE config_key = ?1 AND status = 'completed'
                 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                params![config.key.to_string(), window.saturating_sub(1) as i64],
                |r| r.get(0),
            )
            .optional()
            .with_context(|| format!("cannot read games db {}", self.path.display()))
    }

    /// Deletes the games of `key` (any status) that are older than its newest `keep` completed
    /// games and have an id of at most `up_to` (exported already), with their moves, in
    /// transactions of at most 2,000 games so a selfplay writer never waits long. Returns how
    /// many games were deleted. `keep` 0 deletes nothing.
    pub(crate) fn prune(&self, key: &str, keep: u64, up_to: i64) -> Result<u64> {
        use rusqlite::OptionalExtension;
        let what = || format!("cannot prune games db {}", self.path.display());
        if keep == 0 {
            return Ok(0);
        }
        let Some(oldest_kept) = self
            .conn
            .query_row(
                "SELECT id FROM games WHERE config_key = ?1 AND status = 'completed'
                 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                params![key, (keep - 1) as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .with_context(what)?
        else {
            return Ok(0);
        };
        let below = oldest_kept.min(up_to.saturating_add(1));
        let mut deleted = 0u64;
        loop {
            let n = self
                .conn
                .execute(
                    "DELETE FROM games WHERE id IN (SELECT id FROM games
                     WHERE config_key = ?1 AND id < ?2 ORDER BY id LIMIT 2000)",
                    params![key, below],
                )
                .with_context(what)?;
            deleted += n as u64;
            if n == 0 {
                return Ok(deleted);
            }
        }
    }

    /// Completed games of `config` with `id > since_id`, in id order. A game whose rows break the
    /// schema's meaning (see [`check_game`]) is left out and listed in `skipped` with the reason;
    /// only a DB that cannot be read at all is an error. The rules themselves are checked by the
    /// caller's replay.
    pub(crate) fn completed_games(&self, config: &GameConfig, since_id: i64) -> Result<GamesRead> {
        let path = self.path.display().to_string();
        let read = || format!("cannot read games from games db {path}");
        let mut raws: Vec<RawGame> = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, num_players, winner, total_moves FROM games
                     WHERE config_key = ?1 AND status = 'completed' AND id > ?2 ORDER BY id",
                )
                .with_context(read)?;
            let mut rows = stmt
                .query(params![config.key.to_string(), since_id])
                .with_context(read)?;
            while let Some(row) = rows.next().with_context(read)? {
                raws.push(RawGame {
                    id: row.get(0).with_context(read)?,
                    num_players: int(row.get_ref(1).with_context(read)?),
                    winner: int(row.get_ref(2).with_context(read)?),
                    total_moves: int(row.get_ref(3).with_context(read)?),
                    moves: Vec::new(),
                });
            }
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT m.game_id, m.move_number, m.player, m.cell
                 FROM moves m JOIN games g ON g.id = m.game_id
                 WHERE g.config_key = ?1 AND g.status = 'completed' AND g.id > ?2
                 ORDER BY m.game_id, m.move_number",
            )
            .with_context(read)?;
        let mut rows = stmt
            .query(params![config.key.to_string(), since_id])
            .with_context(read)?;
        let mut at = 0;
        while let Some(row) = rows.next().with_context(read)? {
            let Ok(Some(game_id)) = int(row.get_ref(0).with_context(read)?) else {
                continue;
            };
            while at < raws.len() && raws[at].id < game_id {
                at += 1;
            }
            if let Some(game) = raws.get_mut(at).filter(|g| g.id == game_id) {
                game.moves.push(RawMove {
                    number: int(row.get_ref(1).with_context(read)?),
                    player: int(row.get_ref(2).with_context(read)?),
                    cell: int(row.get_ref(3).with_context(read)?),
                });
            }
        }
        let mut out = GamesRead::default();
        for raw in &raws {
            out.last_id = Some(raw.id);
            match check_game(config, raw) {
                Ok(game) => out.games.push(game),
                Err(bad) => out.skipped.push(Skipped {
                    id: raw.id,
                    reason: bad.to_string(),
                }),
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::game::play_game;
    use fastrand::Rng;

    fn hex6() -> GameConfig {
        GameConfig::parse("hex6_2p").unwrap()
    }

    fn new_game(record: &GameRecord) -> NewGame<'_> {
        NewGame {
            record,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            completed_at: "2026-01-01T00:00:01.000Z".into(),
        }
    }

    #[test]
    fn games_round_trip_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/games/hex6_2p.db");
        let config = hex6();
        let mut rng = Rng::with_seed(1);
        let records: Vec<GameRecord> = (0..5)
            .map(|_| play_game(&config, [None, None], 0.0, &mut rng))
            .collect();
        let mut db = GamesDb::create(&path).unwrap();
        let games: Vec<NewGame> = records.iter().map(new_game).collect();
        let ids = db.insert_games(&config, "selfplay", &games).unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        let mode: String = db
            .connection()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(db);

        let db = GamesDb::open_existing(&path).unwrap();
        let all = db.completed_games(&config, 0).unwrap().games;
        assert_eq!(all.len(), 5);
        for (stored, record) in all.iter().zip(&records) {
            assert_eq!(stored.moves, record.moves);
            assert_eq!(stored.winner, record.winner);
        }
        let later = db.completed_games(&config, 3).unwrap().games;
        assert_eq!(later.iter().map(|g| g.id).collect::<Vec<_>>(), vec![4, 5]);
        let hex8 = GameConfig::parse("hex8_2p").unwrap();
        assert!(db.completed_games(&hex8, 0).unwrap().games.is_empty());
        let (status, source, board, players, total): (String, String, String, i64, i64) = db
            .connection()
            .query_row(
                "SELECT status, source, board_type, num_players, total_moves FROM games WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(
            (status.as_str(), source.as_str(), board.as_str(), players),
            ("completed", "selfplay", "hex6", 2)
        );
        assert_eq!(total as usize, records[0].moves.len());
    }

    #[test]
    fn aborted_games_are_not_exported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let config = hex6();
        let record = play_game(&config, [None, None], 0.0, &mut Rng::with_seed(2));
        let mut db = GamesDb::create(&path).unwrap();
        db.insert_games(&config, "selfplay", &[new_game(&record)])
            .unwrap();
        db.connection()
            .execute("UPDATE games SET status = 'aborted'", [])
            .unwrap();
        assert_eq!(
            db.completed_games(&config, 0).unwrap(),
            GamesRead::default()
        );
    }

    #[test]
    fn damaged_rows_are_skipped_with_the_reason_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let config = hex6();
        let mut rng = Rng::with_seed(3);
        let records: Vec<GameRecord> = (0..4)
            .map(|_| play_game(&config, [None, None], 0.0, &mut rng))
            .collect();
        let mut db = GamesDb::create(&path).unwrap();
        let games: Vec<NewGame> = records.iter().map(new_game).collect();
        db.insert_games(&config, "selfplay", &games).unwrap();
        let c = db.connection();
        c.execute(
            "DELETE FROM moves WHERE game_id = 1 AND move_number = 2",
            [],
        )
        .unwrap();
        c.execute("UPDATE games SET winner = 7 WHERE id = 2", [])
            .unwrap();
        c.execute("UPDATE games SET winner = 'x' WHERE id = 4", [])
            .unwrap();
        let read = db.completed_games(&config, 0).unwrap();
        assert_eq!(read.games.iter().map(|g| g.id).collect::<Vec<_>>(), [3]);
        assert_eq!(read.last_id, Some(4));
        assert_eq!(
            read.skipped,
            [
                Skipped {
                    id: 1,
                    reason: format!(
                        "total_moves is {} but {} moves are stored",
                        records[0].moves.len(),
                        records[0].moves.len() - 1
                    )
                },
                Skipped {
                    id: 2,
                    reason: "winner 7 is not a player of this 2-player game".into()
                },
                Skipped {
                    id: 4,
                    reason: "winner is text, not an integer".into()
                },
            ]
        );
    }

    fn raw(winner: Int, moves: &[(i64, i64, i64)]) -> RawGame {
        RawGame {
            id: 9,
            num_players: Ok(Some(2)),
            winner,
            total_moves: Ok(Some(moves.len() as i64)),
            moves: moves
                .iter()
                .map(|&(n, p, c)| RawMove {
                    number: Ok(Some(n)),
                    player: Ok(Some(p)),
                    cell: Ok(Some(c)),
                })
                .collect(),
        }
    }

    #[test]
    fn row_checks_name_the_first_broken_rule() {
        let c = hex6();
        let good = [(1, 1, 0), (2, 2, 35), (3, 1, 7)];
        assert_eq!(
            check_game(&c, &raw(Ok(Some(2)), &good)),
            Ok(StoredGame {
                id: 9,
                winner: 2,
                moves: vec![0, 35, 7]
            })
        );
        let err = |winner: Int, moves: &[(i64, i64, i64)]| {
            check_game(&c, &raw(winner, moves)).unwrap_err().to_string()
        };
        assert_eq!(err(Ok(None), &good), "winner is NULL");
        assert_eq!(
            err(Ok(Some(0)), &good),
            "winner 0 is not a player of this 2-player game"
        );
        assert_eq!(
            err(Ok(Some(3)), &good),
            "winner 3 is not a player of this 2-player game"
        );
        assert_eq!(
            err(Err("a blob"), &good),
            "winner is a blob, not an integer"
        );
        assert_eq!(
            err(Ok(Some(1)), &[(1, 1, 0), (2, 2, 36)]),
            "move 2 is on cell 36, off the board (0..36)"
        );
        assert_eq!(
            err(Ok(Some(1)), &[(1, 1, -1)]),
            "move 1 is on cell -1, off the board (0..36)"
        );
        assert_eq!(
            err(Ok(Some(1)), &[(1, 1, 0), (2, 1, 1)]),
            "move 2 is by player 1, expected 2"
        );
        assert_eq!(
            err(Ok(Some(1)), &[(1, 1, 0), (3, 1, 1)]),
            "move 2 is missing (found move 3)"
        );
        let mut three = raw(Ok(Some(1)), &good);
        three.num_players = Ok(Some(3));
        assert_eq!(
            check_game(&c, &three).unwrap_err().to_string(),
            "num_players is 3, but hex6_2p games have 2"
        );
        let mut short = raw(Ok(Some(1)), &good);
        short.total_moves = Ok(Some(5));
        assert_eq!(
            check_game(&c, &short).unwrap_err().to_string(),
            "total_moves is 5 but 3 moves are stored"
        );
    }

    #[test]
    fn missing_garbage_and_foreign_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.db");
        let err = format!("{:#}", GamesDb::open_existing(&missing).err().unwrap());
        assert!(err.ends_with("none.db does not exist"), "{err}");

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let err = format!("{:#}", GamesDb::open_existing(&garbage).err().unwrap());
        assert!(err.contains("is not a usable sqlite database"), "{err}");
        assert!(err.contains("not a database"), "{err}");

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let err = format!("{:#}", GamesDb::open_existing(&foreign).err().unwrap());
        assert!(err.contains("has no games/moves tables"), "{err}");
    }
}

/// A games DB as today's selfplay job writes it (tests/fixtures/games_hex6_2p.sql, see the README
/// there) must open and export in later versions.
#[cfg(test)]
mod fixture {
    use super::*;
    use crate::jobs::game::play_game;
    use fastrand::Rng;

    const DUMP: &str = include_str!("../../tests/fixtures/games_hex6_2p.sql");

    #[test]
    fn a_games_db_written_by_this_version_opens_reads_and_takes_more_games() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/games/hex6_2p.db");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(DUMP)
            .unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let read = GamesDb::open_existing(&path)
            .unwrap()
            .completed_games(&config, 0)
            .unwrap();
        assert!(read.skipped.is_empty(), "{:?}", read.skipped);
        assert_eq!(read.last_id, Some(2));
        let ids: Vec<i64> = read.games.iter().map(|g| g.id).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(read.games[0].moves.len(), 33);
        assert_eq!(read.games[1].moves.len(), 29);
        assert!(read.games.iter().all(|g| g.winner == 1));
        // As export checks them: the moves replay by the rules to the stored winner.
        for g in &read.games {
            let winner = crate::jobs::game::samples(&config, &g.moves, |_, _| {}).unwrap();
            assert_eq!(winner, g.winner, "game {}", g.id);
        }

        // `create` on the existing file keeps its games and appends after them.
        let mut db = GamesDb::create(&path).unwrap();
        let record = play_game(&config, [None, None], 0.0, &mut Rng::with_seed(3));
        let added = db
            .insert_games_by(
                &config,
                "test",
                Some(RANDOM_MODEL),
                &[NewGame {
                    record: &record,
                    created_at: "2026-11-29T12:00:00.000Z".into(),
                    completed_at: "2026-11-29T12:00:01.000Z".into(),
                }],
            )
            .unwrap();
        assert_eq!(added, [3]);
        let again = db.completed_games(&config, 0).unwrap();
        assert_eq!(again.games.len(), 3);
        assert_eq!(db.completed_games(&config, 2).unwrap().games.len(), 1);
        let models: Vec<Option<String>> = db
            .connection()
            .prepare("SELECT model FROM games ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(models, [None, None, Some(RANDOM_MODEL.to_string())]);
    }

    /// A games DB whose games name their model (tests/fixtures/games_hex6_2p_model.sql) opens,
    /// reads, and says who played.
    #[test]
    fn a_games_db_with_the_model_column_opens_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hex6_2p.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(include_str!("../../tests/fixtures/games_hex6_2p_model.sql"))
            .unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let db = GamesDb::open_existing(&path).unwrap();
        let read = db.completed_games(&config, 0).unwrap();
        assert!(read.skipped.is_empty(), "{:?}", read.skipped);
        assert_eq!(read.games.len(), 2);
        for g in &read.games {
            let winner = crate::jobs::game::samples(&config, &g.moves, |_, _| {}).unwrap();
            assert_eq!(winner, g.winner, "game {}", g.id);
        }
        let models: i64 = db
            .connection()
            .query_row(
                "SELECT count(*) FROM games WHERE model = ?1",
                [RANDOM_MODEL],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(models, 2);
    }

    /// The fixture predates the `model` column: opening it (to read, as export does, or to write,
    /// as selfplay does) adds the column, NULL for the games already there, and nothing else
    /// changes; opening it again finds the column and leaves it be.
    #[test]
    fn a_games_db_from_before_the_model_column_gains_it_when_opened() {
        for open in [GamesDb::open_existing, GamesDb::create] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("hex6_2p.db");
            let old = Connection::open(&path).unwrap();
            old.execute_batch(DUMP).unwrap();
            assert!(!has_model_column(&old).unwrap(), "the fixture is old");
            let before: Vec<(i64, String)> = old
                .prepare("SELECT id, created_at FROM games ORDER BY id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            // A second writer races to migrate: both succeed.
            let db = open(&path).unwrap();
            migrate(&old, &path).unwrap();
            drop(db);
            let db = open(&path).unwrap();
            let c = db.connection();
            assert!(has_model_column(c).unwrap());
            let after: Vec<(i64, String, Option<String>)> = c
                .prepare("SELECT id, created_at, model FROM games ORDER BY id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(
                after,
                before
                    .into_iter()
                    .map(|(id, at)| (id, at, None))
                    .collect::<Vec<_>>()
            );
        }
    }
}
