//! queue_populator: keeps `target_depth` selfplay items pending in the work queue, so the
//! scheduler always has work and the work follows the scheduler's priorities.
//!
//! Each cycle (and at once on SELFPLAY_COMPLETE, when an item has just been used up) it:
//! 1. requeues items claimed or running for longer than twice the selfplay job's `max_runtime`
//!    (their worker died or hung: the supervisor would have stopped the job long before);
//! 2. reads `data/coordination/priorities.json` (see [`weights`]) and re-prioritizes pending items;
//! 3. tops the queue up to `target_depth`, `games_per_item` games per item, spreading new items over
//!    the config keys by priority;
//! 4. prunes finished items older than [`PRUNE_AFTER_SECS`].
//!
//! Everything it needs is in the queue DB itself, so it keeps no state file: a restart loses nothing.
//!
//! On a node in a cluster the queue is the cluster's shared one (worker/pipeline/work.rs) and this
//! daemon runs on one node at a time (its lease): each scan tops the shared queue up to
//! `target_depth` items outstanding (queued or running, counted per key by the stream), spread by
//! the same priorities. Steps 1 and 4 are the bus's there: an item whose node died comes back by
//! itself after `cluster.work_ack_wait`, and a completed item leaves the stream.

use std::collections::BTreeMap;

use anyhow::Result;
use ringrift::events::Event;
use serde_json::Value;

use super::selfplay_scheduler::{fmt_map, read_priorities};
use super::{Pipeline, now_secs, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::QueueSettings;
use ringrift::work_queue::WorkQueue;

const NAME: &str = "queue_populator";

/// Finished items are kept this long for inspection.
pub(crate) const PRUNE_AFTER_SECS: f64 = 7.0 * 86_400.0;

/// The weight of each config key: its priority from the scheduler's file; equal weights without
/// one. A key the file does not list (or lists with a non-positive priority) gets the smallest
/// positive priority listed, so a new key is served, modestly, before the scheduler rates it.
pub(crate) fn weights(
    keys: &[String],
    priorities: Option<&BTreeMap<String, f64>>,
) -> BTreeMap<String, f64> {
    let usable = |p: f64| p.is_finite() && p > 0.0;
    let floor = priorities
        .and_then(|p| {
            keys.iter()
                .filter_map(|k| p.get(k).copied())
                .filter(|p| usable(*p))
                .reduce(f64::min)
        })
        .unwrap_or(1.0);
    keys.iter()
        .map(|k| {
            let w = priorities
                .and_then(|p| p.get(k).copied())
                .filter(|p| usable(*p))
                .unwrap_or(floor);
            (k.clone(), w)
        })
        .collect()
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    scans: u64,
    items_added: u64,
    items_requeued: u64,
    items_abandoned: u64,
    items_pruned: u64,
}

pub(crate) struct QueuePopulator {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    queue: Option<WorkQueue>,
    target_depth: u64,
    games_per_item: u64,
    /// Claimed/running items older than this are stale.
    stale_after: f64,
    totals: Totals,
    last: Option<Scan>,
    /// What went wrong in the last scan.
    problem: Option<String>,
    /// A priorities.json that could not be read (equal weights were used).
    priorities_problem: Option<String>,
}

/// What one scan saw and did.
#[derive(Debug, Clone)]
struct Scan {
    when: String,
    added: BTreeMap<String, u64>,
    requeued: u64,
    abandoned: u64,
    counts: BTreeMap<String, u64>,
    pending_by_key: BTreeMap<String, u64>,
    weights: BTreeMap<String, f64>,
    equal_weights: bool,
}

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(QueuePopulator {
        ctx: None,
        pipeline: None,
        queue: None,
        target_depth: 20,
        games_per_item: 50,
        stale_after: 3600.0,
        totals: Totals::default(),
        last: None,
        problem: None,
        priorities_problem: None,
    })
}

impl QueuePopulator {
    async fn scan(&mut self) {
        if self.pipeline.as_ref().expect("started").shared_queue {
            self.scan_shared().await;
        } else {
            self.scan_local();
        }
    }

    /// One scan of the cluster's shared queue: a top-up through the supervisor.
    async fn scan_shared(&mut self) {
        let (weights, equal_weights) = self.weights();
        let ctx = self.ctx.as_ref().expect("attached");
        // Step 1, for the whole cluster: items claimed for longer than twice their job's
        // max_runtime (selfplay; training: train; evaluation: gauntlet) lose their claim and
        // come back.
        let max_of = |kind: &str| {
            self.pipeline
                .as_ref()
                .and_then(|p| p.jobs.get(kind))
                .map_or(3600.0, |(_, max)| max.as_secs_f64())
        };
        let older_than_secs = BTreeMap::from([
            (ringrift::work_queue::SELFPLAY.to_string(), self.stale_after),
            (
                ringrift::work_queue::TRAINING.to_string(),
                2.0 * max_of("train"),
            ),
            (
                ringrift::work_queue::EVALUATION.to_string(),
                2.0 * max_of("gauntlet"),
            ),
        ]);
        match ctx
            .work(ringrift::protocol::WorkOp::Reap { older_than_secs })
            .await
        {
            ringrift::protocol::WorkAnswer::Reaped { items } if !items.is_empty() => {
                println!(
                    "{NAME}: took the claim away from {} item(s) claimed for over {}s: {items:?}",
                    items.len(),
                    self.stale_after
                );
                self.totals.items_requeued += items.len() as u64;
            }
            ringrift::protocol::WorkAnswer::Refused { message } => {
                eprintln!("{NAME}: shared work queue: {message}");
            }
            _ => {}
        }
        let answer = ctx
            .work(ringrift::protocol::WorkOp::TopUp {
                target: self.target_depth,
                games_per_item: self.games_per_item,
                weights: weights.clone(),
            })
            .await;
        self.totals.scans += 1;
        match answer {
            ringrift::protocol::WorkAnswer::ToppedUp { added, outstanding } => {
                let n: u64 = added.values().sum();
                self.totals.items_added += n;
                let total: u64 = outstanding.values().sum();
                if n > 0 {
                    println!(
                        "{NAME}: added {n} item(s) to the shared queue ({}); now {total} outstanding",
                        fmt_counts(&added)
                    );
                }
                let counts = BTreeMap::from([
                    ("pending".to_string(), total),
                    ("claimed".to_string(), 0),
                    ("running".to_string(), 0),
                    ("completed".to_string(), 0),
                    ("failed".to_string(), 0),
                    ("timeout".to_string(), 0),
                ]);
                self.problem = None;
                self.last = Some(Scan {
                    when: ringrift::timefmt::now_rfc3339(),
                    added,
                    requeued: 0,
                    abandoned: 0,
                    counts,
                    pending_by_key: outstanding,
                    weights,
                    equal_weights,
                });
            }
            other => {
                let why = super::work::refused(other);
                eprintln!("{NAME}: {why:#}");
                self.problem = Some(format!("{why:#}"));
            }
        }
    }

    /// The weight of each key (see [`weights`]) and whether they are equal for want of priorities.
    fn weights(&mut self) -> (BTreeMap<String, f64>, bool) {
        let pipeline = self.pipeline.as_ref().expect("started");
        let (priorities, equal_weights) = match read_priorities(pipeline) {
            Ok(p) => {
                self.priorities_problem = None;
                let equal = p.is_none();
                (p, equal)
            }
            Err(e) => {
                eprintln!("{NAME}: {e:#}; using equal weights");
                self.priorities_problem = Some(format!("{e:#}"));
                (None, true)
            }
        };
        (
            weights(&pipeline.config_keys, priorities.as_ref()),
            equal_weights,
        )
    }

    fn scan_local(&mut self) {
        let (weights, equal_weights) = self.weights();
        let pipeline = self.pipeline.as_ref().expect("started");
        if self.queue.is_none() {
            match WorkQueue::open(&pipeline.work_queue()) {
                Ok(q) => self.queue = Some(q),
                Err(e) => {
                    eprintln!("{NAME}: {e:#}");
                    self.problem = Some(format!("{e:#}"));
                    return;
                }
            }
        }
        let queue = self.queue.as_mut().expect("opened");
        let now = now_secs();
        let mut was_empty = false;
        let result: Result<Scan> = (|| {
            was_empty = queue.counts()?.get("pending").copied().unwrap_or(0) == 0;
            let (requeued, abandoned) = queue.requeue_stale(self.stale_after, now)?;
            queue.reprioritize(&weights)?;
            let added = queue.top_up(self.target_depth, self.games_per_item, &weights, now)?;
            let pruned = queue.prune(now - PRUNE_AFTER_SECS)?;
            self.totals.items_pruned += pruned;
            Ok(Scan {
                when: ringrift::timefmt::now_rfc3339(),
                added,
                requeued,
                abandoned,
                counts: queue.counts()?,
                pending_by_key: queue.pending_by_key()?,
                weights: weights.clone(),
                equal_weights,
            })
        })();
        self.totals.scans += 1;
        match result {
            Ok(scan) => {
                let added: u64 = scan.added.values().sum();
                self.totals.items_added += added;
                self.totals.items_requeued += scan.requeued;
                self.totals.items_abandoned += scan.abandoned;
                if added > 0 || scan.requeued > 0 || scan.abandoned > 0 {
                    println!(
                        "{NAME}: added {} item(s) ({}), requeued {} stale, abandoned {}; now {} pending",
                        added,
                        fmt_counts(&scan.added),
                        scan.requeued,
                        scan.abandoned,
                        scan.counts["pending"]
                    );
                }
                // A scheduler that found the queue empty waits for its next cycle: wake it.
                let pending = scan.counts.get("pending").copied().unwrap_or(0);
                if was_empty
                    && pending > 0
                    && let Some(ctx) = &self.ctx
                {
                    ctx.emit(
                        "WORK_QUEUED",
                        ringrift::events::payload([
                            ("added", added.into()),
                            ("pending", pending.into()),
                        ]),
                    );
                }
                self.problem = None;
                self.last = Some(scan);
            }
            Err(e) => {
                eprintln!("{NAME}: work queue: {e:#}");
                self.problem = Some(format!("{e:#}"));
                // Reopen next time: the file may have been replaced or repaired.
                self.queue = None;
            }
        }
    }

    fn report(&self) -> Report {
        let mut problems = Vec::new();
        if let Some(p) = &self.problem {
            problems.push(format!("work queue: {p}"));
        }
        if let Some(p) = &self.priorities_problem {
            problems.push(format!("priorities: {p} (equal weights used)"));
        }
        let healthy = problems.is_empty();
        let mut details = BTreeMap::new();
        details.insert("target_depth".to_string(), Value::from(self.target_depth));
        details.insert(
            "games_per_item".to_string(),
            Value::from(self.games_per_item),
        );
        let summary = match &self.last {
            None => "no scan yet".to_string(),
            Some(s) => {
                details.insert(
                    "counts".into(),
                    serde_json::to_value(&s.counts).unwrap_or(Value::Null),
                );
                details.insert(
                    "pending_by_key".into(),
                    serde_json::to_value(&s.pending_by_key).unwrap_or(Value::Null),
                );
                details.insert(
                    "weights".into(),
                    serde_json::to_value(&s.weights).unwrap_or(Value::Null),
                );
                details.insert("last_scan".into(), Value::from(s.when.clone()));
                let shared = self.pipeline.as_ref().is_some_and(|p| p.shared_queue);
                if shared {
                    format!(
                        "last scan {}: {} outstanding in the shared queue of {} (added {}); weights {}{}",
                        s.when,
                        s.counts["pending"],
                        self.target_depth,
                        s.added.values().sum::<u64>(),
                        fmt_map(&s.weights),
                        if s.equal_weights {
                            " (no priorities yet: equal)"
                        } else {
                            ""
                        }
                    )
                } else {
                    format!(
                        "last scan {}: {} pending of {} (added {}, requeued {}), {} running, {} completed, {} failed, {} timed out; weights {}{}",
                        s.when,
                        s.counts["pending"],
                        self.target_depth,
                        s.added.values().sum::<u64>(),
                        s.requeued,
                        s.counts["claimed"] + s.counts["running"],
                        s.counts["completed"],
                        s.counts["failed"],
                        s.counts["timeout"],
                        fmt_map(&s.weights),
                        if s.equal_weights {
                            " (no priorities yet: equal)"
                        } else {
                            ""
                        }
                    )
                }
            }
        };
        let message = if healthy {
            summary
        } else {
            format!("{}; {summary}", problems.join("; "))
        };
        let t = self.totals;
        Report::new(
            healthy,
            message,
            details,
            [
                ("scans", t.scans),
                ("items_added", t.items_added),
                ("items_requeued", t.items_requeued),
                ("items_abandoned", t.items_abandoned),
                ("items_pruned", t.items_pruned),
            ],
        )
    }
}

fn fmt_counts(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Daemon for QueuePopulator {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["SELFPLAY_COMPLETE".into()]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, QueueSettings::from_map)?;
            self.target_depth = s.target_depth;
            self.games_per_item = s.games_per_item;
            let selfplay_max = pipeline
                .jobs
                .get("selfplay")
                .map(|(_, max)| max.as_secs_f64())
                .unwrap_or(3600.0);
            self.stale_after = 2.0 * selfplay_max;
            println!(
                "{NAME}: keeping {} selfplay items of {} games {}; stale after {}s",
                self.target_depth,
                self.games_per_item,
                if pipeline.shared_queue {
                    "outstanding in the cluster's shared queue".to_string()
                } else {
                    format!("pending in {}", pipeline.work_queue().display())
                },
                self.stale_after
            );
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.scan().await;
            self.report()
        })
    }

    fn on_event(&mut self, _event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            self.scan().await;
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        vec!["hex6_2p".into(), "hex8_2p".into()]
    }

    #[test]
    fn weights_are_equal_without_priorities_and_follow_them_otherwise() {
        let equal = weights(&keys(), None);
        assert_eq!(equal["hex6_2p"], 1.0);
        assert_eq!(equal["hex8_2p"], 1.0);
        let p = BTreeMap::from([
            ("hex8_2p".to_string(), 0.8),
            ("hex6_2p".to_string(), 0.2),
            ("square8_2p".to_string(), 5.0),
        ]);
        let w = weights(&keys(), Some(&p));
        assert_eq!(w.len(), 2, "keys outside the pipeline are ignored");
        assert_eq!((w["hex6_2p"], w["hex8_2p"]), (0.2, 0.8));
        // An unlisted or non-positive key gets the smallest listed priority.
        let p = BTreeMap::from([("hex8_2p".to_string(), 0.8)]);
        assert_eq!(weights(&keys(), Some(&p))["hex6_2p"], 0.8);
        let p = BTreeMap::from([("hex8_2p".to_string(), 0.6), ("hex6_2p".to_string(), -1.0)]);
        assert_eq!(weights(&keys(), Some(&p))["hex6_2p"], 0.6);
    }

    /// A populator over `root` with a depth of 4 items of 20 games.
    fn populator(root: &std::path::Path) -> QueuePopulator {
        QueuePopulator {
            ctx: None,
            pipeline: Some(Pipeline::for_test(root, keys())),
            queue: None,
            target_depth: 4,
            games_per_item: 20,
            stale_after: 10.0,
            totals: Totals::default(),
            last: None,
            problem: None,
            priorities_problem: None,
        }
    }

    #[test]
    fn a_scan_tops_up_requeues_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = populator(dir.path());
        daemon.scan_local();
        let report = daemon.report();
        assert!(report.health.healthy, "{}", report.health.message);
        assert_eq!(report.counters["items_added"], 4);
        assert!(
            report.health.message.contains("4 pending of 4"),
            "{}",
            report.health.message
        );
        assert!(
            report.health.message.contains("equal"),
            "{}",
            report.health.message
        );

        // An item claimed long ago is requeued; the queue stays at its depth.
        let q = WorkQueue::open(&dir.path().join("data/work_queue.db")).unwrap();
        let item = q.claim("elsewhere", now_secs() - 100.0).unwrap().unwrap();
        daemon.scan_local();
        let report = daemon.report();
        assert_eq!(report.counters["items_requeued"], 1);
        assert_eq!(
            report.counters["items_added"], 4,
            "the requeued copy refills the queue"
        );
        assert_eq!(q.counts().unwrap()["timeout"], 1);
        assert!(!q.complete(item.id, now_secs()).unwrap());

        // A corrupt priorities file is reported, not fatal.
        std::fs::create_dir_all(dir.path().join("data/coordination")).unwrap();
        std::fs::write(
            dir.path().join("data/coordination/priorities.json"),
            b"{oops",
        )
        .unwrap();
        daemon.scan_local();
        let report = daemon.report();
        assert!(!report.health.healthy);
        assert_eq!(report.health.status, "degraded");
        assert!(
            report.health.message.contains("priorities"),
            "{}",
            report.health.message
        );
        assert_eq!(report.counters["scans"], 3);
    }

    #[test]
    fn a_corrupt_queue_db_degrades_health() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/work_queue.db"), vec![0x5a; 8192]).unwrap();
        let mut daemon = populator(dir.path());
        daemon.scan_local();
        let report = daemon.report();
        assert!(!report.health.healthy);
        assert!(
            report
                .health
                .message
                .contains("not a usable sqlite database"),
            "{}",
            report.health.message
        );
    }
}
