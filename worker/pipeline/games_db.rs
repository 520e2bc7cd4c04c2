//! The pipeline's side of a damaged games DB: check before use, move aside, tell everyone.
//!
//! The daemons that open `data/games/<key>.db` for a step call [`ensure_usable`]:
//! selfplay_scheduler and idle_resource before their selfplay jobs (a schema look) and after one
//! fails (with `quick_check`), auto_export when the DB cannot be counted or its export job fails
//! (with `quick_check`). A DB that is damaged beyond use
//! ([`crate::jobs::db_health`]) is renamed to `<key>.db.bad-<unix secs>` and announced with
//! GAMES_DB_QUARANTINED `{config_key, db_path, moved_to, error}`; the next selfplay job creates a
//! fresh DB at the old path. The daemon keeps the [`Quarantined`] record for its health.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::{Pipeline, now_secs};
pub(crate) use crate::jobs::db_health::Depth;
use crate::jobs::db_health::{self, DbHealth};
use crate::runtime::Ctx;
use ringrift::events::payload;

/// A games DB moved aside, for health.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Quarantined {
    pub key: String,
    pub db_path: String,
    pub moved_to: String,
    pub error: String,
    /// RFC 3339 time of the move.
    pub at: String,
}

impl Quarantined {
    /// `quarantined <db> as <moved_to> at <time>: <error>`
    pub(crate) fn describe(&self) -> String {
        format!(
            "quarantined games db {} as {} at {}: {}",
            self.db_path, self.moved_to, self.at, self.error
        )
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({"config_key": self.key, "db_path": self.db_path, "moved_to": self.moved_to,
               "error": self.error, "at": self.at})
    }
}

/// Checks `key`'s games DB at `depth` ([`Depth::Schema`] before a use, [`Depth::Full`] after one
/// failed) and quarantines it if it is damaged (see the module doc), emitting
/// GAMES_DB_QUARANTINED as `who`. `Ok(None)`: usable or missing; `Ok(Some(_))`: it was moved
/// aside; `Err(why)`: it cannot be checked now, or is damaged and could not be moved (retry later).
pub(crate) fn ensure_usable(
    pipeline: &Pipeline,
    ctx: &Ctx,
    who: &str,
    key: &str,
    depth: Depth,
) -> Result<Option<Quarantined>, DbUnusable> {
    let db = pipeline.games_db(key);
    match db_health::check(&db, depth) {
        DbHealth::Missing | DbHealth::Usable => Ok(None),
        DbHealth::Unavailable(why) => Err(DbUnusable::Unavailable { db, why }),
        DbHealth::Damaged(why) => {
            let moved = match db_health::quarantine(&db, now_secs() as u64) {
                Ok(moved) => moved,
                Err(source) => return Err(DbUnusable::NotMoved { db, why, source }),
            };
            let q = Quarantined {
                key: key.to_string(),
                db_path: db.display().to_string(),
                moved_to: moved.display().to_string(),
                error: why,
                at: ringrift::timefmt::now_rfc3339(),
            };
            eprintln!("{who}: {key}: {}; a fresh one starts", q.describe());
            ctx.emit(
                "GAMES_DB_QUARANTINED",
                payload([
                    ("config_key", key.into()),
                    ("db_path", q.db_path.clone().into()),
                    ("moved_to", q.moved_to.clone().into()),
                    ("error", q.error.clone().into()),
                ]),
            );
            Ok(Some(q))
        }
    }
}

/// A games DB that can be neither used nor replaced now (see [`ensure_usable`]); retry later.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbUnusable {
    #[error("games db {db} cannot be checked now: {why}")]
    Unavailable { db: PathBuf, why: String },
    #[error("games db {db} is damaged ({why}) and {source}")]
    NotMoved {
        db: PathBuf,
        why: String,
        source: db_health::QuarantineError,
    },
}
