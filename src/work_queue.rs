//! The selfplay work queue, `data/work_queue.db`: what queue_populator fills and selfplay_scheduler
//! drains.
//!
//! It is SQLite (WAL, busy timeout) rather than an in-memory channel because the producer and the
//! consumer are separate processes that restart independently: an item survives either side dying,
//! and an item whose consumer died mid-job is found again by [`WorkQueue::requeue_stale`] instead of
//! being lost. Claiming is one `UPDATE … WHERE id = (SELECT …) RETURNING …` statement: SQLite takes
//! the write lock when such a statement starts, so two consumers can never claim the same item.
//!
//! ```sql
//! work_items(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT ('selfplay'), priority REAL,
//!            config TEXT ({"config_key": "...", "games": N}),
//!            status TEXT (pending|claimed|running|completed|failed|timeout), attempts INTEGER,
//!            created_at REAL, claimed_at REAL, completed_at REAL, claimed_by TEXT, error TEXT,
//!            not_before REAL (a failed item waits until then before it is claimed again))
//! ```
//! Times are unix seconds.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A selfplay item: play `games` games of a config key ([`SelfplaySpec`]).
pub const SELFPLAY: &str = "selfplay";

/// A training item of the cluster's shared queue: train a config key's next candidate on the
/// claiming node's latest export (`{"config_key": ...}`).
pub const TRAINING: &str = "training";

/// An evaluation item of the cluster's shared queue: play one candidate through the gauntlet and
/// put its results beside it on its training node ([`EvaluationSpec`]).
pub const EVALUATION: &str = "evaluation";

/// What an evaluation item asks for: a candidate as the node that trained it has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Its config key.
    pub config_key: String,
    /// The node whose `models/candidates/<key>/` holds it, and receives its results file.
    pub node: String,
    /// Its path on that node (what the results file records as `model_path`).
    pub model_path: String,
    /// The SHA-256 of its content, 64 lower-case hex digits: what is played must have it.
    pub model_sha256: String,
    /// The SHA-256 of that node's canonical model of the key when the item was queued: the
    /// baseline the candidate is played against (None: there was none, and it plays random
    /// play only).
    #[serde(default)]
    pub baseline_sha256: Option<String>,
}

/// An item that timed out this many times is not requeued again (it stays `timeout`).
pub const MAX_ATTEMPTS: i64 = 3;

/// In the cluster's shared queue: an item handed back this many times by nodes that cannot run
/// it at all (`WorkOp::Release`) is set aside: no node of the cluster can.
pub const MAX_RELEASES: i64 = 10;

/// Every status an item can have, in the order of its life.
pub const STATUSES: &[&str] = &[
    "pending",
    "claimed",
    "running",
    "completed",
    "failed",
    "timeout",
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS work_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    priority REAL NOT NULL DEFAULT 0,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'claimed', 'running', 'completed', 'failed', 'timeout')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    claimed_at REAL,
    completed_at REAL,
    claimed_by TEXT,
    error TEXT,
    not_before REAL
);
CREATE INDEX IF NOT EXISTS work_items_by_status ON work_items (status, type, priority DESC, id);
";

/// What a selfplay item asks for (the `config` column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfplaySpec {
    /// The board and players (`hex8_2p`).
    pub config_key: String,
    /// How many games the job plays.
    pub games: u64,
}

/// A claimed item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claimed {
    /// The item's id (the row id; in the cluster's shared queue, its sequence number in the
    /// JetStream stream, which a redelivery keeps).
    pub id: i64,
    /// Its type: [`SELFPLAY`].
    pub item_type: String,
    /// Higher is claimed first.
    pub priority: f64,
    /// The raw `config` JSON.
    pub config: String,
    /// Earlier attempts that failed or timed out (0 the first time; in the shared queue, earlier
    /// deliveries, including those to nodes that died).
    pub attempts: i64,
}

impl Claimed {
    /// What an evaluation item asks for; an error names the item and its bad `config`.
    pub fn evaluation_spec(&self) -> Result<EvaluationSpec> {
        serde_json::from_str(&self.config)
            .with_context(|| format!("work item {}: bad config {:?}", self.id, self.config))
    }

    /// What a selfplay item asks for; an error names the item and its bad `config`.
    pub fn selfplay_spec(&self) -> Result<SelfplaySpec> {
        serde_json::from_str(&self.config)
            .with_context(|| format!("work item {}: bad config {:?}", self.id, self.config))
    }
}

/// What became of an item whose job failed ([`WorkQueue::fail_attempt`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Attempt {
    /// Pending again, claimable from `at` (unix seconds); `attempts` failures so far.
    Retry {
        /// Failures so far.
        attempts: i64,
        /// When it may be claimed again.
        at: f64,
    },
    /// Failed for good after `attempts` failures (the dead-letter state).
    Dead {
        /// Failures in all.
        attempts: i64,
    },
}

/// The columns of an [`Item`], in the order [`Item::from_row`] reads them.
const ITEM_COLUMNS: &str = "id, type, priority, config, status, attempts, created_at, claimed_at, \
                            completed_at, claimed_by, error";

/// One item as `queue list` and `queue show` print it. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Its id.
    pub id: i64,
    /// Its type ([`SELFPLAY`]).
    #[serde(rename = "type")]
    pub item_type: String,
    /// Higher is claimed first.
    pub priority: f64,
    /// What it asks for (for selfplay, a [`SelfplaySpec`]), as stored.
    pub config: serde_json::Value,
    /// One of [`STATUSES`].
    pub status: String,
    /// Earlier attempts that failed or timed out.
    pub attempts: i64,
    /// When it was added (or retried).
    pub created_at: f64,
    /// When it was last claimed.
    pub claimed_at: Option<f64>,
    /// When it ended (completed, failed, timeout).
    pub completed_at: Option<f64>,
    /// Who claimed it: `<daemon>:<pid>`.
    pub claimed_by: Option<String>,
    /// Why it failed or timed out.
    pub error: Option<String>,
    /// In the cluster's shared queue: the node that runs it now (running), or ran its last
    /// attempt (failed). Always None in the local queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Item {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
        let config: String = row.get(3)?;
        Ok(Item {
            id: row.get(0)?,
            item_type: row.get(1)?,
            priority: row.get(2)?,
            config: serde_json::from_str(&config).unwrap_or(serde_json::Value::String(config)),
            status: row.get(4)?,
            attempts: row.get(5)?,
            created_at: row.get(6)?,
            claimed_at: row.get(7)?,
            completed_at: row.get(8)?,
            claimed_by: row.get(9)?,
            error: row.get(10)?,
            node: None,
        })
    }
}

/// Why an operator's change of an item was not made.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No item has this id.
    #[error("no work item {0}")]
    NotFound(i64),
    /// The item is not in a status the change applies to.
    #[error("work item {id} is {status}: this applies only to an item that is {allowed}")]
    WrongStatus {
        /// The item.
        id: i64,
        /// Its status now.
        status: String,
        /// The statuses the change applies to.
        allowed: String,
    },
    /// The queue could not be read or written.
    #[error(transparent)]
    Db(#[from] anyhow::Error),
}

/// An open connection to the queue.
pub struct WorkQueue {
    conn: Connection,
}

impl WorkQueue {
    /// Opens (creating the file, its directory and the schema if needed) the queue at `path`.
    pub fn open(path: &Path) -> Result<WorkQueue> {
        let conn = crate::sqlite::create(path, "work queue", BUSY_TIMEOUT)?;
        conn.execute_batch(SCHEMA).with_context(|| {
            format!("cannot create the schema of work queue {}", path.display())
        })?;
        // Queues made before retries with a delay have no not_before column.
        let has_not_before: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('work_items') WHERE name = 'not_before'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .with_context(|| format!("cannot read the schema of work queue {}", path.display()))?;
        if !has_not_before {
            conn.execute_batch("ALTER TABLE work_items ADD COLUMN not_before REAL")
                .with_context(|| {
                    format!("cannot add not_before to work queue {}", path.display())
                })?;
        }
        Ok(WorkQueue { conn })
    }

    /// Adds one pending item.
    #[cfg(test)]
    pub fn push(&self, item_type: &str, priority: f64, config: &str, now: f64) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO work_items (type, priority, config, status, attempts, created_at)
             VALUES (?1, ?2, ?3, 'pending', 0, ?4)",
            params![item_type, priority, config, now],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Pending selfplay items per config key.
    pub fn pending_by_key(&self) -> Result<BTreeMap<String, u64>> {
        pending_by_key(&self.conn)
    }

    /// Adds pending selfplay items until `target` are pending, spread over the keys of `weights`
    /// by [`allocate`]; each item's priority is its key's weight. Returns the items added per key.
    pub fn top_up(
        &mut self,
        target: u64,
        games_per_item: u64,
        weights: &BTreeMap<String, f64>,
        now: f64,
    ) -> Result<BTreeMap<String, u64>> {
        let tx = self.conn.transaction()?;
        let pending = pending_by_key(&tx)?;
        let plan = allocate(weights, &pending, target);
        {
            let mut insert = tx.prepare(
                "INSERT INTO work_items (type, priority, config, status, attempts, created_at)
                 VALUES (?1, ?2, ?3, 'pending', 0, ?4)",
            )?;
            for (key, n) in &plan {
                let config = serde_json::to_string(&SelfplaySpec {
                    config_key: key.clone(),
                    games: games_per_item,
                })?;
                let priority = weights.get(key).copied().unwrap_or(0.0);
                for _ in 0..*n {
                    insert.execute(params![SELFPLAY, priority, config, now])?;
                }
            }
        }
        tx.commit()?;
        Ok(plan)
    }

    /// Sets the priority of every pending selfplay item of each key to its current weight, so claims
    /// follow the scheduler's latest priorities rather than those of the day an item was created.
    pub fn reprioritize(&self, weights: &BTreeMap<String, f64>) -> Result<u64> {
        let mut changed = 0;
        for (key, weight) in weights {
            changed += self.conn.execute(
                "UPDATE work_items SET priority = ?1
                 WHERE status = 'pending' AND type = ?2
                   AND json_extract(config, '$.config_key') = ?3 AND priority != ?1",
                params![weight, SELFPLAY, key],
            )? as u64;
        }
        Ok(changed)
    }

    /// Claims the highest-priority pending item (oldest first among equals) for `worker_id`, in one
    /// statement: two claimers never get the same item.
    pub fn claim(&self, worker_id: &str, now: f64) -> Result<Option<Claimed>> {
        let claimed = self
            .conn
            .query_row(
                "UPDATE work_items SET status = 'claimed', claimed_at = ?1, claimed_by = ?2
                 WHERE id = (SELECT id FROM work_items WHERE status = 'pending'
                               AND (not_before IS NULL OR not_before <= ?1)
                             ORDER BY priority DESC, id LIMIT 1)
                   AND status = 'pending'
                 RETURNING id, type, priority, config, attempts",
                params![now, worker_id],
                |row| {
                    Ok(Claimed {
                        id: row.get(0)?,
                        item_type: row.get(1)?,
                        priority: row.get(2)?,
                        config: row.get(3)?,
                        attempts: row.get(4)?,
                    })
                },
            )
            .optional()?;
        Ok(claimed)
    }

    /// claimed → running. False if the item is no longer claimed by `worker_id` (requeued as stale).
    pub fn mark_running(&self, id: i64, worker_id: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE work_items SET status = 'running'
             WHERE id = ?1 AND status = 'claimed' AND claimed_by = ?2",
            params![id, worker_id],
        )?;
        Ok(n == 1)
    }

    /// claimed/running → completed.
    pub fn complete(&self, id: i64, now: f64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE work_items SET status = 'completed', completed_at = ?2, error = NULL
             WHERE id = ?1 AND status IN ('claimed', 'running')",
            params![id, now],
        )?;
        Ok(n == 1)
    }

    /// A job of the item failed: it is pending again after `backoff` doubled per earlier failure
    /// (attempts + 1, not claimed before then), or, at its [`MAX_ATTEMPTS`]th failure, `failed`
    /// for good: the dead-letter state, which `queue list --status failed` shows and `queue
    /// retry` revives. None when the item was not claimed or running (a stale requeue took it).
    pub fn fail_attempt(
        &self,
        id: i64,
        error: &str,
        now: f64,
        backoff: f64,
    ) -> Result<Option<Attempt>> {
        let tx = self.conn.unchecked_transaction()?;
        let attempts: Option<i64> = tx
            .query_row(
                "SELECT attempts FROM work_items WHERE id = ?1 AND status IN ('claimed', 'running')",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(attempts) = attempts.map(|a| a + 1) else {
            return Ok(None);
        };
        let outcome = if attempts >= MAX_ATTEMPTS {
            tx.execute(
                "UPDATE work_items SET status = 'failed', attempts = ?2, completed_at = ?3,
                     error = ?4
                 WHERE id = ?1",
                params![id, attempts, now, error],
            )?;
            Attempt::Dead { attempts }
        } else {
            let at = now + backoff * 2f64.powi(attempts as i32 - 1);
            tx.execute(
                "UPDATE work_items SET status = 'pending', attempts = ?2, not_before = ?3,
                     claimed_at = NULL, claimed_by = NULL, error = ?4
                 WHERE id = ?1",
                params![id, attempts, at, error],
            )?;
            Attempt::Retry { attempts, at }
        };
        tx.commit()?;
        Ok(Some(outcome))
    }

    /// claimed/running (or pending, for an item that cannot be run at all) → failed with `error`.
    pub fn fail(&self, id: i64, error: &str, now: f64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE work_items SET status = 'failed', completed_at = ?2, error = ?3
             WHERE id = ?1 AND status IN ('pending', 'claimed', 'running')",
            params![id, now, error],
        )?;
        Ok(n == 1)
    }

    /// Items per status (every status present, zero when none).
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, u64> = STATUSES.iter().map(|s| (s.to_string(), 0)).collect();
        let mut stmt = self
            .conn
            .prepare("SELECT status, count(*) FROM work_items GROUP BY status")?;
        for row in stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })? {
            let (status, n) = row?;
            out.insert(status, n as u64);
        }
        Ok(out)
    }

    /// Items claimed or running since before `now - stale_after` become `timeout`; each gets a new
    /// pending copy with attempts + 1, unless it already had [`MAX_ATTEMPTS`]. One transaction.
    /// Returns (requeued, abandoned).
    pub fn requeue_stale(&mut self, stale_after: f64, now: f64) -> Result<(u64, u64)> {
        self.requeue_where(
            "status IN ('claimed', 'running') AND claimed_at < ?1",
            vec![(now - stale_after).into()],
            &format!("no result within {stale_after:.0}s of being claimed"),
            now,
        )
    }

    /// Items claimed or running by a claimer whose id starts with `prefix` but is not `keep`: a
    /// previous process of the same consumer, which died with them. Same treatment as stale items.
    pub fn requeue_orphans(&mut self, prefix: &str, keep: &str, now: f64) -> Result<(u64, u64)> {
        self.requeue_where(
            "status IN ('claimed', 'running')
             AND substr(claimed_by, 1, length(?1)) = ?1 AND claimed_by != ?2",
            vec![prefix.to_string().into(), keep.to_string().into()],
            &format!("orphaned: its claimer is gone (not {keep})"),
            now,
        )
        .map_err(|e| e.context("cannot requeue orphaned items"))
    }

    fn requeue_where(
        &mut self,
        condition: &str,
        args: Vec<rusqlite::types::Value>,
        error: &str,
        now: f64,
    ) -> Result<(u64, u64)> {
        let tx = self.conn.transaction()?;
        let stale: Vec<(i64, String, f64, String, i64)> = {
            let sql = format!(
                "SELECT id, type, priority, config, attempts FROM work_items WHERE {condition}"
            );
            let mut stmt = tx.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(&args), |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let (mut requeued, mut abandoned) = (0, 0);
        for (id, item_type, priority, config, attempts) in stale {
            tx.execute(
                "UPDATE work_items SET status = 'timeout', completed_at = ?2, error = ?3 WHERE id = ?1",
                params![id, now, error],
            )?;
            let attempts = attempts + 1;
            if attempts >= MAX_ATTEMPTS {
                abandoned += 1;
                continue;
            }
            tx.execute(
                "INSERT INTO work_items (type, priority, config, status, attempts, created_at)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5)",
                params![item_type, priority, config, attempts, now],
            )?;
            requeued += 1;
        }
        tx.commit()?;
        Ok((requeued, abandoned))
    }

    /// Deletes finished items (completed, failed, timeout) that finished before `before`.
    pub fn prune(&self, before: f64) -> Result<u64> {
        Ok(self.conn.execute(
            "DELETE FROM work_items
             WHERE status IN ('completed', 'failed', 'timeout') AND completed_at < ?1",
            [before],
        )? as u64)
    }

    /// The items with `status` (all when None), newest first, at most `limit`.
    pub fn list(&self, status: Option<&str>, limit: u64) -> Result<Vec<Item>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ITEM_COLUMNS} FROM work_items WHERE ?1 IS NULL OR status = ?1
             ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![status, limit as i64], Item::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The item `id`, if there is one.
    pub fn item(&self, id: i64) -> Result<Option<Item>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {ITEM_COLUMNS} FROM work_items WHERE id = ?1"),
                [id],
                Item::from_row,
            )
            .optional()?)
    }

    /// An operator's retry of an item that was set aside: `failed`, or `timeout` after its last
    /// attempt (an earlier timeout was requeued as a new item already, and retrying it too would
    /// queue the same work twice). It is pending again, with its attempts reset and its last
    /// claim and error cleared; it counts as added `now`.
    pub fn retry(&self, id: i64, now: f64) -> Result<Item, OpError> {
        self.change(
            id,
            &["failed", "timeout after its last attempt"],
            &format!(
                "UPDATE work_items SET status = 'pending', attempts = 0, created_at = ?2,
                     claimed_at = NULL, claimed_by = NULL, completed_at = NULL, error = NULL,
                     not_before = NULL
                 WHERE id = ?1 AND (status = 'failed'
                                    OR (status = 'timeout' AND attempts + 1 >= {MAX_ATTEMPTS}))"
            ),
            params![id, now],
        )
    }

    /// An operator's cancel of an item no job runs yet (pending, or claimed and not started): it
    /// becomes `failed` with the error "cancelled by the operator". A running item's job is not
    /// cut off (it ends within its maximum runtime), so it cannot be cancelled.
    pub fn cancel(&self, id: i64, now: f64) -> Result<Item, OpError> {
        self.change(
            id,
            &["pending", "claimed"],
            "UPDATE work_items SET status = 'failed', completed_at = ?2,
                 error = 'cancelled by the operator (queue cancel)'
             WHERE id = ?1 AND status IN ('pending', 'claimed')",
            params![id, now],
        )
    }

    fn change(
        &self,
        id: i64,
        from: &[&str],
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Item, OpError> {
        let n = self
            .conn
            .execute(sql, args)
            .map_err(|e| OpError::Db(e.into()))?;
        let item = self
            .item(id)
            .map_err(OpError::Db)?
            .ok_or(OpError::NotFound(id))?;
        if n == 1 {
            Ok(item)
        } else {
            Err(OpError::WrongStatus {
                id,
                status: item.status,
                allowed: from.join(" or "),
            })
        }
    }

    /// The SQLite connection, for tests that look at the table itself.
    #[cfg(test)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

fn pending_by_key(conn: &Connection) -> Result<BTreeMap<String, u64>> {
    let mut stmt =
        conn.prepare("SELECT config FROM work_items WHERE status = 'pending' AND type = ?1")?;
    let mut out = BTreeMap::new();
    for config in stmt.query_map([SELFPLAY], |row| row.get::<_, String>(0))? {
        let config = config?;
        // An item whose config does not parse still occupies the queue; it counts under "?" so the
        // depth stays honest, and the scheduler fails it when it claims it.
        let key = serde_json::from_str::<SelfplaySpec>(&config)
            .map(|s| s.config_key)
            .unwrap_or_else(|_| "?".into());
        *out.entry(key).or_insert(0) += 1;
    }
    Ok(out)
}

/// How many new items each key gets so that `target` items are pending and the pending mix follows
/// `weights`: each new item goes to the key with the highest weight / (pending + 1) (the D'Hondt
/// rule), so a key with twice the weight ends up with about twice the items. Keys with a weight ≤ 0
/// (or not a number) get nothing; if no key has a positive weight, all get equal weights.
pub fn allocate(
    weights: &BTreeMap<String, f64>,
    pending: &BTreeMap<String, u64>,
    target: u64,
) -> BTreeMap<String, u64> {
    let total_pending: u64 = pending.values().sum();
    let mut out = BTreeMap::new();
    if total_pending >= target || weights.is_empty() {
        return out;
    }
    let positive = weights.values().any(|w| w.is_finite() && *w > 0.0);
    let weight = |key: &str| -> f64 {
        if !positive {
            return 1.0;
        }
        let w = weights[key];
        if w.is_finite() && w > 0.0 { w } else { 0.0 }
    };
    let mut have: BTreeMap<&str, u64> = weights
        .keys()
        .map(|k| (k.as_str(), pending.get(k).copied().unwrap_or(0)))
        .collect();
    for _ in 0..target - total_pending {
        let best = have
            .iter()
            .filter(|(k, _)| weight(k) > 0.0)
            .map(|(k, n)| (*k, weight(k) / (*n as f64 + 1.0)))
            // max_by keeps the last of equals; reversed comparison of keys keeps the first.
            .fold(None::<(&str, f64)>, |best, (k, q)| match best {
                Some((_, bq)) if bq >= q => best,
                _ => Some((k, q)),
            });
        let Some((key, _)) = best else { break };
        *have.get_mut(key).expect("known key") += 1;
        *out.entry(key.to_string()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    fn w(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn p(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn allocation_follows_weights_and_existing_items() {
        let weights = w(&[("hex6_2p", 1.0), ("hex8_2p", 2.0)]);
        assert_eq!(
            allocate(&weights, &p(&[]), 6),
            p(&[("hex6_2p", 2), ("hex8_2p", 4)])
        );
        // hex8 already has 4 pending: the 2 missing items go to hex6.
        assert_eq!(
            allocate(&weights, &p(&[("hex8_2p", 4)]), 6),
            p(&[("hex6_2p", 2)])
        );
        assert!(allocate(&weights, &p(&[("hex8_2p", 9)]), 6).is_empty());
        // Equal weights split evenly, first key first on a tie.
        let equal = w(&[("hex6_2p", 1.0), ("hex8_2p", 1.0)]);
        assert_eq!(
            allocate(&equal, &p(&[]), 3),
            p(&[("hex6_2p", 2), ("hex8_2p", 1)])
        );
        // No positive weight at all: equal weights. A zero weight among positive ones: nothing.
        let zeros = w(&[("hex6_2p", 0.0), ("hex8_2p", f64::NAN)]);
        assert_eq!(
            allocate(&zeros, &p(&[]), 4),
            p(&[("hex6_2p", 2), ("hex8_2p", 2)])
        );
        let one_zero = w(&[("hex6_2p", 0.0), ("hex8_2p", 1.0)]);
        assert_eq!(allocate(&one_zero, &p(&[]), 3), p(&[("hex8_2p", 3)]));
    }

    /// A queue in `dir` with one pending selfplay item, and its id.
    fn one_item(dir: &Path) -> (WorkQueue, i64) {
        let q = WorkQueue::open(&dir.join("q.db")).unwrap();
        let id = q
            .push(
                SELFPLAY,
                1.0,
                r#"{"config_key": "hex8_2p", "games": 5}"#,
                0.0,
            )
            .unwrap();
        (q, id)
    }

    #[test]
    fn a_failed_item_waits_its_backoff_and_is_set_aside_after_its_last_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (q, id) = one_item(dir.path());
        let mut now = 10.0;
        for attempt in 1..MAX_ATTEMPTS {
            let c = q.claim("w", now).unwrap().expect("claimable");
            assert_eq!(c.id, id);
            let a = q.fail_attempt(id, "boom", now, 2.0).unwrap().unwrap();
            let wait = 2.0 * 2f64.powi(attempt as i32 - 1);
            assert_eq!(
                a,
                Attempt::Retry {
                    attempts: attempt,
                    at: now + wait
                }
            );
            // Not before its time.
            assert!(q.claim("w", now + wait - 0.5).unwrap().is_none());
            now += wait;
        }
        q.claim("w", now).unwrap().unwrap();
        let a = q
            .fail_attempt(id, "boom at last", now, 2.0)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            Attempt::Dead {
                attempts: MAX_ATTEMPTS
            }
        );
        let item = q.item(id).unwrap().unwrap();
        assert_eq!(item.status, "failed");
        assert_eq!(item.error.as_deref(), Some("boom at last"));
        assert!(
            q.claim("w", now + 1e6).unwrap().is_none(),
            "set aside for good"
        );
        // Not claimed (any more): nothing to record.
        assert_eq!(q.fail_attempt(id, "again", now, 2.0).unwrap(), None);
        // The operator's retry makes it claimable at once.
        q.retry(id, now).unwrap();
        assert_eq!(q.claim("w", now).unwrap().unwrap().id, id);
    }

    #[test]
    fn a_timed_out_item_that_was_requeued_cannot_be_retried_too() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, id) = one_item(dir.path());
        q.claim("w", 1.0).unwrap().unwrap();
        assert_eq!(q.requeue_stale(10.0, 100.0).unwrap(), (1, 0));
        // Its copy is pending: retrying the original would queue the same work twice.
        let e = q.retry(id, 101.0).unwrap_err();
        assert!(
            e.to_string().contains("timeout after its last attempt"),
            "{e}"
        );
        assert_eq!(q.counts().unwrap()["pending"], 1);
    }

    #[test]
    fn an_operator_cancels_only_waiting_items_and_retries_only_ended_ones() {
        let dir = tempfile::tempdir().unwrap();
        let q = WorkQueue::open(&dir.path().join("q.db")).unwrap();
        let cfg = r#"{"config_key": "hex8_2p", "games": 5}"#;
        let waiting = q.push(SELFPLAY, 1.0, cfg, 10.0).unwrap();
        let running = q.push(SELFPLAY, 2.0, cfg, 10.0).unwrap();
        let c = q.claim("w", 11.0).unwrap().unwrap();
        assert_eq!(c.id, running);
        assert!(q.mark_running(running, "w").unwrap());
        // A running job is not cut off by a cancel; a waiting item is cancelled.
        let e = q.cancel(running, 12.0).unwrap_err();
        assert!(matches!(e, OpError::WrongStatus { .. }), "{e}");
        assert!(e.to_string().contains("is running"), "{e}");
        let item = q.cancel(waiting, 12.0).unwrap();
        assert_eq!(item.status, "failed");
        assert!(matches!(q.cancel(99, 12.0), Err(OpError::NotFound(99))));
        // Retry: a failed item is pending again with a clean slate; a running one is not.
        assert!(matches!(
            q.retry(running, 13.0),
            Err(OpError::WrongStatus { .. })
        ));
        let item = q.retry(waiting, 13.0).unwrap();
        assert_eq!(
            (
                item.status.as_str(),
                item.attempts,
                item.error,
                item.created_at
            ),
            ("pending", 0, None, 13.0)
        );
        // Listing: newest first, by status.
        let ids: Vec<i64> = q.list(None, 10).unwrap().iter().map(|i| i.id).collect();
        assert_eq!(ids, [running, waiting]);
        assert_eq!(q.list(Some("running"), 10).unwrap()[0].id, running);
        assert_eq!(q.item(waiting).unwrap().unwrap().config["games"], 5);
    }

    #[test]
    fn top_up_claim_run_complete_and_fail() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = WorkQueue::open(&dir.path().join("data/work_queue.db")).unwrap();
        let weights = w(&[("hex6_2p", 1.0), ("hex8_2p", 3.0)]);
        let added = q.top_up(4, 20, &weights, 100.0).unwrap();
        assert_eq!(added, p(&[("hex6_2p", 1), ("hex8_2p", 3)]));
        assert!(q.top_up(4, 20, &weights, 101.0).unwrap().is_empty());
        assert_eq!(q.counts().unwrap()["pending"], 4);

        let a = q.claim("w1", 102.0).unwrap().unwrap();
        assert_eq!(a.priority, 3.0, "highest priority first");
        assert_eq!(
            a.selfplay_spec().unwrap(),
            SelfplaySpec {
                config_key: "hex8_2p".into(),
                games: 20
            }
        );
        assert!(q.mark_running(a.id, "w1").unwrap());
        assert!(!q.mark_running(a.id, "w1").unwrap(), "already running");
        assert!(q.complete(a.id, 103.0).unwrap());
        let b = q.claim("w1", 104.0).unwrap().unwrap();
        assert!(b.id > a.id, "oldest first among equals");
        assert!(q.fail(b.id, "exit 1", 105.0).unwrap());
        let counts = q.counts().unwrap();
        assert_eq!(
            (counts["pending"], counts["completed"], counts["failed"]),
            (2, 1, 1)
        );
        let error: String = q
            .connection()
            .query_row("SELECT error FROM work_items WHERE id = ?1", [b.id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(error, "exit 1");
        // Now both pending hex8 items... one hex8 and one hex6 are left.
        assert_eq!(
            q.pending_by_key().unwrap(),
            p(&[("hex6_2p", 1), ("hex8_2p", 1)])
        );
        // New priorities reorder pending items.
        assert_eq!(q.reprioritize(&w(&[("hex6_2p", 5.0)])).unwrap(), 1);
        let c = q.claim("w2", 106.0).unwrap().unwrap();
        assert_eq!(c.selfplay_spec().unwrap().config_key, "hex6_2p");
        // Pruning removes only finished items older than the cut.
        assert_eq!(q.prune(104.0).unwrap(), 1);
        assert_eq!(q.counts().unwrap()["failed"], 1);
    }

    #[test]
    fn stale_and_orphaned_items_are_requeued_until_max_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = WorkQueue::open(&dir.path().join("q.db")).unwrap();
        q.push(SELFPLAY, 1.0, r#"{"config_key":"hex8_2p","games":5}"#, 0.0)
            .unwrap();
        let first = q.claim("selfplay_scheduler:1", 10.0).unwrap().unwrap();
        assert_eq!(
            q.requeue_stale(100.0, 50.0).unwrap(),
            (0, 0),
            "not stale yet"
        );
        assert_eq!(q.requeue_stale(100.0, 111.0).unwrap(), (1, 0));
        let counts = q.counts().unwrap();
        assert_eq!((counts["timeout"], counts["pending"]), (1, 1));
        assert!(
            !q.complete(first.id, 112.0).unwrap(),
            "a timed-out item stays timed out"
        );

        let second = q.claim("selfplay_scheduler:2", 120.0).unwrap().unwrap();
        assert_eq!(second.attempts, 1);
        assert_eq!(second.config, first.config);
        // A new process of the same consumer releases what its predecessor held.
        assert_eq!(
            q.requeue_orphans("selfplay_scheduler:", "selfplay_scheduler:3", 130.0)
                .unwrap(),
            (1, 0)
        );
        let third = q.claim("selfplay_scheduler:3", 131.0).unwrap().unwrap();
        assert_eq!(third.attempts, 2);
        assert_eq!(
            q.requeue_orphans("selfplay_scheduler:", "selfplay_scheduler:3", 132.0)
                .unwrap(),
            (0, 0),
            "its own items are not orphans"
        );
        assert_eq!(
            q.requeue_stale(1.0, 500.0).unwrap(),
            (0, 1),
            "third attempt: abandoned"
        );
        assert_eq!(q.counts().unwrap()["pending"], 0);
    }

    /// Two connections (two processes, in production) claim at once from the same file: every item
    /// is claimed exactly once.
    #[test]
    fn concurrent_claims_never_share_an_item() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let items = 200;
        {
            let q = WorkQueue::open(&path).unwrap();
            for i in 0..items {
                q.push(
                    SELFPLAY,
                    (i % 7) as f64,
                    r#"{"config_key":"hex8_2p","games":1}"#,
                    0.0,
                )
                .unwrap();
            }
        }
        let barrier = Arc::new(Barrier::new(2));
        let claimers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let path = path.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let q = WorkQueue::open(&path).unwrap();
                    barrier.wait();
                    let mut got = Vec::new();
                    while let Some(item) = q.claim(who, 1.0).unwrap() {
                        got.push(item.id);
                    }
                    got
                })
            })
            .collect();
        let got: Vec<Vec<i64>> = claimers.into_iter().map(|t| t.join().unwrap()).collect();
        let mut all: Vec<i64> = got.concat();
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(total, items, "every item claimed");
        assert_eq!(all.len(), items, "no item claimed twice");
        let q = WorkQueue::open(&path).unwrap();
        for (who, ids) in ["a", "b"].iter().zip(&got) {
            let n: i64 = q
                .connection()
                .query_row(
                    "SELECT count(*) FROM work_items WHERE claimed_by = ?1",
                    [who],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n as usize, ids.len());
        }
    }

    #[test]
    fn a_garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = format!("{:#}", WorkQueue::open(&path).err().unwrap());
        assert!(err.contains("not a usable sqlite database"), "{err}");
    }
}

/// A queue as today's version leaves it (tests/fixtures/work_queue.sql, see the README there)
/// must open and keep working in later versions.
#[cfg(test)]
mod fixture {
    use super::*;

    const DUMP: &str = include_str!("../tests/fixtures/work_queue.sql");

    #[test]
    fn a_queue_written_by_this_version_opens_and_items_are_claimed_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/work_queue.db");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(DUMP)
            .unwrap();
        let mut q = WorkQueue::open(&path).unwrap();
        let counts = q.counts().unwrap();
        assert_eq!(
            (counts["completed"], counts["pending"]),
            (4, 2),
            "{counts:?}"
        );
        assert_eq!(
            q.pending_by_key().unwrap(),
            BTreeMap::from([("hex8_2p".to_string(), 2)])
        );

        // The oldest pending item is claimed, run and completed; ids continue after the last.
        let now = 1_795_953_600.0;
        let c = q.claim("test:1", now).unwrap().unwrap();
        assert_eq!((c.id, c.item_type.as_str(), c.attempts), (5, SELFPLAY, 0));
        assert_eq!(
            c.selfplay_spec().unwrap(),
            SelfplaySpec {
                config_key: "hex8_2p".into(),
                games: 2
            }
        );
        assert!(q.mark_running(c.id, "test:1").unwrap());
        assert!(q.complete(c.id, now + 1.0).unwrap());
        let weights = BTreeMap::from([("hex8_2p".to_string(), 1.0)]);
        assert_eq!(q.top_up(2, 2, &weights, now).unwrap()["hex8_2p"], 1);
        let newest: i64 = q
            .connection()
            .query_row("SELECT max(id) FROM work_items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(newest, 7);
        assert_eq!(q.counts().unwrap()["completed"], 5);
    }
}
