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
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .with_context(|| format!("{what} {} is not a usable sqlite database", path.display()))?;
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
