//! How the SQLite files that jobs, daemons and the CLI share are opened (the games DBs, the work
//! queue): WAL mode, so a reader works while a writer appends, with a busy timeout, so a writer
//! waits for another's lock instead of failing at once.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::Connection;

/// Opens the DB at `path`, creating the file and its directory if needed, and sets it up as
/// [`configure`] does. `what` names the DB in messages (`games db`, `work queue`).
pub fn create(path: &Path, what: &str, busy: Duration) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let conn =
        Connection::open(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    configure(conn, path, what, busy)
}

/// Sets up an open connection to the DB at `path`: waits up to `busy` for another connection's
/// lock, switches to WAL mode (an error names a file that is not a usable SQLite DB) and to
/// `synchronous = NORMAL` (durable at each checkpoint, which is enough for WAL).
pub fn configure(conn: Connection, path: &Path, what: &str, busy: Duration) -> Result<Connection> {
    conn.busy_timeout(busy)
        .context("cannot set the busy timeout")?;
    // Switching to WAL needs an exclusive lock, and SQLite answers SQLITE_BUSY at once instead
    // of calling the busy handler when another connection holds one (two daemons creating the
    // same DB at start): retried here for up to `busy`, every 10 ms.
    let started = std::time::Instant::now();
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && started.elapsed() < busy =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e @ rusqlite::Error::SqliteFailure(..))
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy)
                ) =>
            {
                return Err(e).with_context(|| format!("{what} {} is busy", path.display()));
            }
            other => {
                break other.with_context(|| {
                    format!("{what} {} is not a usable sqlite database", path.display())
                })?;
            }
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "{what} {}: cannot switch to WAL mode (journal mode is {mode})",
            path.display()
        );
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL;")
        .with_context(|| format!("cannot configure the {what}"))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switching_to_wal_waits_for_another_connections_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            holder.execute_batch("COMMIT").unwrap();
        });
        let conn = create(&path, "test db", Duration::from_secs(5)).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        release.join().unwrap();
    }
}
