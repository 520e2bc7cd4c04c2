//! Is a games DB file usable at all, and if not, moving it aside so a fresh one can start.
//!
//! The system this replaces kept failing on a games DB that SQLite could not open: selfplay failed
//! forever and nothing said why. Here the daemons that open a games DB check it first
//! ([`check`]: the schema before each use, `quick_check` too after a use failed); a file that is damaged beyond use is renamed to `<name>.bad-<unix secs>`
//! ([`quarantine`]) with its `-wal`/`-shm` files, reported, and the next selfplay job creates a
//! fresh DB at the old path.
//!
//! Only what SQLite itself calls damage leads to quarantine: "file is not a database", "database
//! disk image is malformed", a `PRAGMA quick_check` that is not `ok`, or a file without the games
//! schema. A busy, locked, unreadable (permissions) or otherwise unavailable file is reported and
//! retried, never moved: that is a condition of the moment, not of the data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

/// How long a check waits for a writer's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The tables of the games schema and the columns the pipeline reads (see `db.rs`).
const SCHEMA: &[(&str, &[&str])] = &[
    (
        "games",
        &[
            "id",
            "config_key",
            "num_players",
            "status",
            "winner",
            "total_moves",
            "source",
        ],
    ),
    ("moves", &["game_id", "move_number", "player", "cell"]),
];

/// What a look at a games DB file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DbHealth {
    /// No file: the next selfplay job creates one.
    Missing,
    /// Opens, passes `quick_check` and has the games schema (or no tables at all yet).
    Usable,
    /// Damaged beyond use: quarantine it. The text says what is wrong.
    Damaged(String),
    /// Could not be checked now (busy, permissions, I/O): try again later, never quarantine.
    Unavailable(String),
}

/// How thorough a [`check`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Depth {
    /// Open and read the schema: catches a file that is not a database and a foreign schema, in
    /// microseconds. For the routine look before each use.
    Schema,
    /// Also `PRAGMA quick_check` (reads every page, O(size of the DB)): for when a use failed.
    Full,
}

/// Damage in SQLite's own words, as opposed to a condition of the moment.
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

fn classify(what: &str, e: rusqlite::Error) -> DbHealth {
    if is_damage(&e) {
        DbHealth::Damaged(format!("{what}: {e}"))
    } else {
        DbHealth::Unavailable(format!("{what}: {e}"))
    }
}

/// Checks the games DB at `path`: opens it read-only, runs `PRAGMA quick_check` (at
/// [`Depth::Full`]) and looks for the games schema's tables and columns. Reads only.
pub(crate) fn check(path: &Path, depth: Depth) -> DbHealth {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DbHealth::Missing,
        Err(e) => return DbHealth::Unavailable(format!("cannot stat: {e}")),
        Ok(m) if !m.is_file() => return DbHealth::Damaged("not a regular file".into()),
        // SQLite treats an empty file as an empty database: the schema is created on first use.
        Ok(m) if m.len() == 0 => return DbHealth::Usable,
        Ok(_) => {}
    }
    let conn = match Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => return classify("cannot open", e),
    };
    if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
        return DbHealth::Unavailable(format!("cannot set a busy timeout: {e}"));
    }
    if depth == Depth::Full {
        let verdict: Result<Vec<String>, rusqlite::Error> = conn
            .prepare("PRAGMA quick_check(5)")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
        match verdict {
            Err(e) => return classify("quick_check failed", e),
            Ok(lines) if lines.len() == 1 && lines[0] == "ok" => {}
            Ok(lines) => return DbHealth::Damaged(format!("quick_check: {}", lines.join("; "))),
        }
    }
    let tables: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    let tables = match tables {
        Ok(t) => t,
        Err(e) => return classify("cannot list tables", e),
    };
    if tables.is_empty() {
        return DbHealth::Usable;
    }
    for (table, columns) in SCHEMA {
        if !tables.iter().any(|t| t == table) {
            return DbHealth::Damaged(format!(
                "not a games db: no {table} table (tables: {})",
                tables.join(", ")
            ));
        }
        let have: Result<Vec<String>, rusqlite::Error> = conn
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .and_then(|mut stmt| stmt.query_map([table], |r| r.get(0))?.collect());
        let have = match have {
            Ok(h) => h,
            Err(e) => return classify(&format!("cannot read the columns of {table}"), e),
        };
        let missing: Vec<&str> = columns
            .iter()
            .copied()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if !missing.is_empty() {
            return DbHealth::Damaged(format!(
                "not a games db: table {table} has no column {}",
                missing.join(", ")
            ));
        }
    }
    DbHealth::Usable
}

/// Moves a damaged games DB aside: `<name>` → `<name>.bad-<now_secs>` (then `-1`, `-2`, ... if
/// that name is taken, so an earlier quarantine is never overwritten), and its `-wal` and `-shm`
/// files to the same name plus `-wal`/`-shm`: left behind, SQLite would replay the old WAL into
/// the fresh DB. Returns where the DB went; the error names the file that could not be moved.
pub(crate) fn quarantine(path: &Path, now_secs: u64) -> Result<PathBuf, QuarantineError> {
    let with = |suffix: &str| {
        let mut s = path.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let mut target = with(&format!(".bad-{now_secs}"));
    let mut n = 0;
    while target.symlink_metadata().is_ok() {
        n += 1;
        target = with(&format!(".bad-{now_secs}-{n}"));
    }
    std::fs::rename(path, &target).map_err(|source| QuarantineError::Move {
        path: path.to_path_buf(),
        source,
    })?;
    for side in ["-wal", "-shm"] {
        let from = with(side);
        if from.symlink_metadata().is_ok() {
            let mut to = target.as_os_str().to_owned();
            to.push(side);
            if let Err(e) = std::fs::rename(&from, &to) {
                // The DB itself is gone from its path; a leftover that cannot be moved must not
                // meet the fresh DB.
                std::fs::remove_file(&from).map_err(|removing| QuarantineError::Leftover {
                    path: from.clone(),
                    moving: e,
                    removing,
                })?;
            }
        }
    }
    Ok(target)
}

/// A damaged games DB (or its `-wal`/`-shm` file) that could not be moved aside.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QuarantineError {
    #[error("cannot move {path} aside: {source}")]
    Move {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move {path} aside ({moving}) nor remove it ({removing})")]
    Leftover {
        path: PathBuf,
        moving: std::io::Error,
        removing: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn games_db(path: &Path) {
        let config = crate::jobs::game::GameConfig::parse("hex6_2p").unwrap();
        let record = crate::jobs::game::play_game(
            &config,
            [None, None],
            0.0,
            &mut fastrand::Rng::with_seed(1),
        );
        super::super::db::GamesDb::create(path)
            .unwrap()
            .insert_games(
                &config,
                "selfplay",
                &[super::super::db::NewGame {
                    record: &record,
                    created_at: "t0".into(),
                    completed_at: "t1".into(),
                }],
            )
            .unwrap();
    }

    #[test]
    fn good_missing_empty_garbage_and_foreign_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.db");
        games_db(&good);
        assert_eq!(check(&good, Depth::Full), DbHealth::Usable);
        assert_eq!(
            check(&dir.path().join("none.db"), Depth::Full),
            DbHealth::Missing
        );
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(check(&empty, Depth::Full), DbHealth::Usable);

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let DbHealth::Damaged(why) = check(&garbage, Depth::Full) else {
            panic!("garbage is damage: {:?}", check(&garbage, Depth::Full));
        };
        assert!(why.contains("not a database"), "{why}");

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert_eq!(
            check(&foreign, Depth::Full),
            DbHealth::Damaged("not a games db: no games table (tables: t)".into())
        );
        let old = dir.path().join("old.db");
        Connection::open(&old)
            .unwrap()
            .execute_batch(
                "CREATE TABLE games (id INTEGER PRIMARY KEY, config_key TEXT, num_players INT,
                                     status TEXT, total_moves INT, source TEXT);
                 CREATE TABLE moves (game_id INT, move_number INT, player INT, cell INT);",
            )
            .unwrap();
        assert_eq!(
            check(&old, Depth::Full),
            DbHealth::Damaged("not a games db: table games has no column winner".into())
        );
    }

    #[test]
    fn a_damaged_page_fails_quick_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        games_db(&path);
        // Fold the WAL into the main file, then smash every page after the header page.
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 4096, "{}", bytes.len());
        for b in &mut bytes[4096..] {
            *b = 0xa5;
        }
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            check(&path, Depth::Schema),
            DbHealth::Usable,
            "a schema look misses it"
        );
        assert!(
            matches!(check(&path, Depth::Full), DbHealth::Damaged(_)),
            "{:?}",
            check(&path, Depth::Full)
        );
    }

    #[test]
    fn quarantine_moves_the_db_and_its_wal_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hex8_2p.db");
        std::fs::write(&db, b"garbage one").unwrap();
        std::fs::write(dir.path().join("hex8_2p.db-wal"), b"wal").unwrap();
        std::fs::write(dir.path().join("hex8_2p.db-shm"), b"shm").unwrap();
        let first = quarantine(&db, 1700).unwrap();
        assert_eq!(first, dir.path().join("hex8_2p.db.bad-1700"));
        assert!(!db.exists());
        assert!(!dir.path().join("hex8_2p.db-wal").exists());
        assert_eq!(
            std::fs::read(dir.path().join("hex8_2p.db.bad-1700-wal")).unwrap(),
            b"wal"
        );
        assert!(dir.path().join("hex8_2p.db.bad-1700-shm").exists());

        std::fs::write(&db, b"garbage two").unwrap();
        let second = quarantine(&db, 1700).unwrap();
        assert_eq!(second, dir.path().join("hex8_2p.db.bad-1700-1"));
        assert_eq!(std::fs::read(&first).unwrap(), b"garbage one");
        assert_eq!(std::fs::read(&second).unwrap(), b"garbage two");

        let err = quarantine(&db, 1701).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot move") && err.contains("hex8_2p.db"),
            "{err}"
        );
    }
}
