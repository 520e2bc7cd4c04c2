//! The work queue a node's daemons use, behind one interface: the single node's SQLite queue
//! (`ringrift::work_queue`, data/work_queue.db) or, on a node in a cluster, the cluster's shared
//! queue on JetStream, which the daemon reaches through its supervisor (`WorkOp` frames; see
//! supervisor/cluster/work.rs). Both claim, complete, hand a failed item back with a growing delay
//! and set it aside after `MAX_ATTEMPTS` failures; the daemon emits WORK_FAILED either way.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use ringrift::protocol::{WorkAnswer, WorkOp};
use ringrift::work_queue::{Attempt, Claimed, SELFPLAY, WorkQueue};

use crate::runtime::Ctx;

/// Says that work item `id` (`item_type`, of `key`) was set aside after `attempts` attempts:
/// WORK_FAILED, with this node's id in a cluster. The same for both queues.
pub(crate) fn work_failed(
    ctx: &Ctx,
    pipeline: &super::Pipeline,
    item_type: &str,
    id: i64,
    key: &str,
    error: &str,
    attempts: i64,
) {
    let node = super::transfer::cluster_view(&pipeline.root).map(|v| v.node_id);
    ctx.emit(
        "WORK_FAILED",
        ringrift::events::payload([
            ("item_id", id.into()),
            ("item_type", item_type.into()),
            ("config_key", key.into()),
            ("node", node.map_or(serde_json::Value::Null, Into::into)),
            ("error", error.into()),
            ("attempts", attempts.into()),
        ]),
    );
}

/// Whether this node claims items of the shared queue for `role` (`selfplay`, `training`,
/// `evaluation`): its record in the cluster view the supervisor writes has that role among
/// `cluster.roles` and is not leaving. Err says why not (no view yet, the role, leaving).
pub(crate) fn may_claim(root: &std::path::Path, role: &str) -> Result<(), String> {
    let view = super::transfer::cluster_view(root)
        .ok_or_else(|| "not on the cluster bus yet".to_string())?;
    let own = view
        .nodes
        .iter()
        .find(|n| n.record.node_id == view.node_id)
        .ok_or_else(|| "this node's record is not in the cluster view yet".to_string())?;
    if own.record.leaving {
        Err("this node is leaving the cluster".into())
    } else if !own.record.roles.iter().any(|r| r == role) {
        Err(format!(
            "cluster.roles of node {} do not include {role}",
            view.node_id
        ))
    } else {
        Ok(())
    }
}

/// A daemon's work queue.
pub(crate) enum Queue {
    /// data/work_queue.db.
    Local(WorkQueue),
    /// The cluster's, through the supervisor.
    Shared(Ctx),
}

/// A shared-queue answer that is not the one asked for, as an error.
pub(crate) fn refused(answer: WorkAnswer) -> anyhow::Error {
    match answer {
        WorkAnswer::Refused { message } => anyhow!("shared work queue: {message}"),
        other => anyhow!("shared work queue: unexpected answer {other:?}"),
    }
}

impl Queue {
    /// The queue of a pipeline: shared on a node in a cluster.
    pub(crate) fn open(pipeline: &super::Pipeline, ctx: &Ctx) -> Result<Queue> {
        if pipeline.shared_queue {
            Ok(Queue::Shared(ctx.clone()))
        } else {
            Ok(Queue::Local(WorkQueue::open(&pipeline.work_queue())?))
        }
    }

    /// The shared queue (items may run on other nodes too).
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self, Queue::Shared(_))
    }

    /// Claims up to `max` selfplay items for `worker_id`.
    pub(crate) async fn claim(
        &self,
        worker_id: &str,
        max: usize,
        now: f64,
    ) -> Result<Vec<Claimed>> {
        match self {
            Queue::Local(q) => {
                let mut items = Vec::new();
                while items.len() < max {
                    match q.claim(worker_id, now)? {
                        Some(item) => items.push(item),
                        None => break,
                    }
                }
                Ok(items)
            }
            Queue::Shared(ctx) => {
                let max = u32::try_from(max).unwrap_or(u32::MAX);
                match ctx
                    .work(WorkOp::Claim {
                        item_type: SELFPLAY.into(),
                        max,
                    })
                    .await
                {
                    WorkAnswer::Claimed { items } => Ok(items),
                    other => Err(refused(other)),
                }
            }
        }
    }

    /// The claimed item's job is about to start.
    pub(crate) fn mark_running(&self, id: i64, worker_id: &str) -> Result<()> {
        match self {
            Queue::Local(q) => q.mark_running(id, worker_id).map(|_| ()),
            // The supervisor knows from the job it spawns for the item.
            Queue::Shared(_) => Ok(()),
        }
    }

    /// The item's job succeeded.
    pub(crate) async fn complete(&self, id: i64, now: f64) -> Result<()> {
        match self {
            Queue::Local(q) => q.complete(id, now).map(|_| ()),
            Queue::Shared(ctx) => match ctx.work(WorkOp::Complete { item_id: id }).await {
                WorkAnswer::Settled { .. } => Ok(()),
                other => Err(refused(other)),
            },
        }
    }

    /// The item's job failed: back after a delay, or set aside after its last attempt.
    pub(crate) async fn fail_attempt(
        &self,
        id: i64,
        error: &str,
        now: f64,
        backoff_secs: f64,
    ) -> Result<Option<Attempt>> {
        match self {
            Queue::Local(q) => q.fail_attempt(id, error, now, backoff_secs),
            Queue::Shared(ctx) => match ctx
                .work(WorkOp::Fail {
                    item_id: id,
                    error: error.to_string(),
                    backoff_secs,
                })
                .await
            {
                WorkAnswer::Settled { attempt } => Ok(attempt),
                other => Err(refused(other)),
            },
        }
    }

    /// An item this node cannot run at all (unknown type, bad config, a key it does not play):
    /// failed for good in the local queue; in the shared one handed back for another node,
    /// without counting as a failed attempt (set aside once no node could run it).
    /// `attempts`: its earlier attempts.
    pub(crate) async fn reject(
        &self,
        id: i64,
        attempts: i64,
        problem: &str,
        now: f64,
    ) -> Result<Option<Attempt>> {
        match self {
            Queue::Local(q) => q.fail(id, problem, now).map(|_| {
                Some(Attempt::Dead {
                    attempts: attempts + 1,
                })
            }),
            Queue::Shared(ctx) => match ctx
                .work(WorkOp::Release {
                    item_id: id,
                    reason: problem.to_string(),
                })
                .await
            {
                WorkAnswer::Settled { attempt } => Ok(attempt),
                other => Err(refused(other)),
            },
        }
    }

    /// Gives pending items their key's current priority (the local queue; the shared queue is
    /// first in, first out, and weighted by how many items queue_populator keeps per key).
    pub(crate) fn reprioritize(&self, weights: &BTreeMap<String, f64>) -> Result<u64> {
        match self {
            Queue::Local(q) => q.reprioritize(weights),
            Queue::Shared(_) => Ok(0),
        }
    }

    /// Pending items, where this node can count them (the local queue).
    pub(crate) fn pending(&self) -> Result<Option<u64>> {
        match self {
            Queue::Local(q) => Ok(Some(q.counts()?.get("pending").copied().unwrap_or(0))),
            Queue::Shared(_) => Ok(None),
        }
    }
}
