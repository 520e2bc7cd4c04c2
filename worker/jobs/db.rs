//! The games DB (`data/games/<config_key>.db`): what selfplay writes and export reads.
//!
//! SQLite in WAL mode with a busy timeout, so an export can read while a selfplay job appends, and
//! one transaction per batch of games, so a job killed mid-run leaves whole games only. Every game
//! read back is replayed against the rules before it is exported: a damaged row is an error that
//! names the game, not a silent bad sample.
//!
//! Schema (moves are 1-based per game; cell = row * side + column):
//!
//! ```sql
//! games(id INTEGER PRIMARY KEY AUTOINCREMENT, config_key TEXT, board_type TEXT, num_players INTEGER,
//!       created_at TEXT, completed_at TEXT, status TEXT ('completed'|'aborted'), winner INTEGER,
//!       total_moves INTEGER, source TEXT)
//! moves(game_id INTEGER REFERENCES games(id), move_number INTEGER, player INTEGER, cell INTEGER,
//!       PRIMARY KEY (game_id, move_number))
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ringrift::game::{GameConfig, GameRecord};
use rusqlite::{Connection, OpenFlags, params};

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
    source TEXT NOT NULL
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

pub(crate) struct GamesDb {
    conn: Connection,
    path: PathBuf,
}

impl GamesDb {
    /// Opens the DB at `path`, creating it (and its directory) and the schema if needed.
    pub(crate) fn create(path: &Path) -> Result<GamesDb> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open games db {}", path.display()))?;
        let db = GamesDb::configure(conn, path)?;
        db.conn
            .execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the schema of games db {}", path.display()))?;
        Ok(db)
    }

    /// Opens an existing DB; refuses a missing file or one without the games schema.
    pub(crate) fn open_existing(path: &Path) -> Result<GamesDb> {
        if !path.is_file() {
            bail!("games db {} does not exist", path.display());
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open games db {}", path.display()))?;
        let db = GamesDb::configure(conn, path)?;
        let tables: i64 = db
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('games', 'moves')",
                [],
                |row| row.get(0),
            )
            .with_context(|| format!("games db {} is not readable", path.display()))?;
        if tables != 2 {
            bail!(
                "games db {} has no games/moves tables (not a games db?)",
                path.display()
            );
        }
        Ok(db)
    }

    /// WAL, busy timeout, foreign keys. The first statement is also where SQLite notices a file
    /// that is not a database.
    fn configure(conn: Connection, path: &Path) -> Result<GamesDb> {
        conn.busy_timeout(BUSY_TIMEOUT)
            .context("cannot set the busy timeout")?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .with_context(|| {
                format!(
                    "games db {} is not a usable sqlite database",
                    path.display()
                )
            })?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!(
                "games db {}: cannot switch to WAL mode (journal mode is {mode})",
                path.display()
            );
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .context("cannot configure the games db")?;
        Ok(GamesDb {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Stores `games` as completed games of `config` in one transaction; returns their ids.
    pub(crate) fn insert_games(
        &mut self,
        config: &GameConfig,
        source: &str,
        games: &[NewGame<'_>],
    ) -> Result<Vec<i64>> {
        let path = self.path.display().to_string();
        let tx = self
            .conn
            .transaction()
            .with_context(|| format!("cannot start a transaction on games db {path}"))?;
        let mut ids = Vec::with_capacity(games.len());
        {
            let mut game_stmt = tx.prepare(
                "INSERT INTO games (config_key, board_type, num_players, created_at, completed_at,
                                    status, winner, total_moves, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'completed', ?6, ?7, ?8)",
            )?;
            let mut move_stmt = tx.prepare(
                "INSERT INTO moves (game_id, move_number, player, cell) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for game in games {
                game_stmt.execute(params![
                    config.key,
                    config.board_type,
                    config.num_players,
                    game.created_at,
                    game.completed_at,
                    game.record.winner,
                    game.record.moves.len() as i64,
                    source,
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

    /// Completed games of `config_key` with `id > since_id`, in id order, with their moves checked
    /// for contiguity and alternation (the rules are checked by the caller's replay).
    pub(crate) fn completed_games(
        &self,
        config_key: &str,
        since_id: i64,
    ) -> Result<Vec<StoredGame>> {
        let path = self.path.display().to_string();
        let read = || format!("cannot read games from games db {path}");
        let mut games: Vec<(StoredGame, i64)> = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, winner, total_moves FROM games
                     WHERE config_key = ?1 AND status = 'completed' AND id > ?2 ORDER BY id",
                )
                .with_context(read)?;
            let rows = stmt
                .query_map(params![config_key, since_id], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Option<i64>>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })
                .with_context(read)?;
            for row in rows {
                let (id, winner, total) = row.with_context(read)?;
                let winner = match winner {
                    Some(w @ 1..=2) => w as u8,
                    other => bail!("game {id}: a completed game with winner {other:?}"),
                };
                games.push((
                    StoredGame {
                        id,
                        winner,
                        moves: Vec::new(),
                    },
                    total,
                ));
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
        let rows = stmt
            .query_map(params![config_key, since_id], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .with_context(read)?;
        let mut at = 0;
        for row in rows {
            let (game_id, number, player, cell) = row.with_context(read)?;
            while at < games.len() && games[at].0.id < game_id {
                at += 1;
            }
            let Some((game, _)) = games.get_mut(at).filter(|(g, _)| g.id == game_id) else {
                bail!("move {number} belongs to game {game_id}, which was not listed");
            };
            let expected_number = game.moves.len() as i64 + 1;
            if number != expected_number {
                bail!("game {game_id}: move {expected_number} is missing (found move {number})");
            }
            let expected_player = if number % 2 == 1 { 1 } else { 2 };
            if player != expected_player {
                bail!(
                    "game {game_id}: move {number} is by player {player}, expected {expected_player}"
                );
            }
            let cell = u8::try_from(cell)
                .with_context(|| format!("game {game_id}: move {number} has cell {cell}"))?;
            game.moves.push(cell);
        }
        games
            .into_iter()
            .map(|(game, total)| {
                if game.moves.len() as i64 != total {
                    bail!(
                        "game {}: total_moves is {total} but {} moves are stored",
                        game.id,
                        game.moves.len()
                    );
                }
                Ok(game)
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringrift::game::play_game;
    use ringrift::game::rng::Rng;

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
        let mut rng = Rng::new(1);
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
        let all = db.completed_games("hex6_2p", 0).unwrap();
        assert_eq!(all.len(), 5);
        for (stored, record) in all.iter().zip(&records) {
            assert_eq!(stored.moves, record.moves);
            assert_eq!(stored.winner, record.winner);
        }
        let later = db.completed_games("hex6_2p", 3).unwrap();
        assert_eq!(later.iter().map(|g| g.id).collect::<Vec<_>>(), vec![4, 5]);
        assert!(db.completed_games("hex8_2p", 0).unwrap().is_empty());
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
        let record = play_game(&config, [None, None], 0.0, &mut Rng::new(2));
        let mut db = GamesDb::create(&path).unwrap();
        db.insert_games(&config, "selfplay", &[new_game(&record)])
            .unwrap();
        db.connection()
            .execute("UPDATE games SET status = 'aborted'", [])
            .unwrap();
        assert!(db.completed_games("hex6_2p", 0).unwrap().is_empty());
    }

    #[test]
    fn damaged_rows_name_the_game() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let config = hex6();
        let record = play_game(&config, [None, None], 0.0, &mut Rng::new(3));
        let mut db = GamesDb::create(&path).unwrap();
        db.insert_games(&config, "selfplay", &[new_game(&record)])
            .unwrap();
        db.connection()
            .execute("DELETE FROM moves WHERE move_number = 2", [])
            .unwrap();
        let err = db.completed_games("hex6_2p", 0).unwrap_err().to_string();
        assert_eq!(err, "game 1: move 2 is missing (found move 3)");
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
