//! UNIFIED_IDLE_SHUTDOWN: terminates a rented cloud instance that has nothing to do, so an idle
//! node stops costing money.
//!
//! It only acts when `shutdown_command` is configured (it is off by default and the daemon is
//! disabled in the default configuration). The node counts as idle when its CPU stays under
//! `cpu_threshold` percent AND the supervisor runs no job, continuously for `idle_minutes`; then the
//! command runs once (with a timeout), and its outcome goes to the daemon's health and log. Any busy
//! sample starts the idle clock over. In a cluster the cluster decides whether this node goes,
//! and when ([`may_leave`]): the costliest idle node first, never below `min_nodes`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ringrift::protocol::SOCKET_ENV;
use serde_json::json;

use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use ringrift::procfs::{self, CpuTimes, cpu_percent};

use crate::pipeline::idle_resource::IdleTracker;
use crate::runtime::{Ctx, Settings};

const NAME: &str = "unified_idle_shutdown";
/// How long the shutdown command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(IdleShutdown::default())
}

/// Whether the node is idle now: CPU under the threshold (any CPU load at a threshold of 100 %)
/// and no job running. Pure, for tests.
pub(crate) fn node_idle(
    cpu_percent: Option<f64>,
    jobs_running: Option<usize>,
    threshold: f64,
) -> bool {
    matches!(cpu_percent, Some(c) if c < threshold || threshold >= 100.0) && jobs_running == Some(0)
}

/// In a cluster, whether this node (idle for `idle_secs`, at least `need_secs`) may intend to
/// leave: no node ranked before it is leaving or idle at least `need_secs` (that one goes first:
/// one node at a time), and at least `min_nodes` other nodes stay (a node that says it is
/// leaving, or has left, counts as gone). The rank:
/// the costliest per hour first (unknown cost counts as 0), then the one idle longest, then the
/// smallest node id. Err says why not. A view that is not connected says nothing of the others:
/// the node stays. Pure, for tests.
///
/// Deciding on records a heartbeat old, two nodes could both find themselves first; so a node
/// first publishes its intent (`leaving` in its record) and fires only once that has been
/// visible for [`settle_secs`]: by then every other node has seen it; one behind it withdraws,
/// one ahead of it counts it as gone.
pub(crate) fn may_leave(
    view: &ringrift::protocol::ClusterReport,
    idle_secs: f64,
    need_secs: f64,
    min_nodes: u64,
) -> Result<(), String> {
    if !view.connected {
        return Err(format!(
            "idle, but this node cannot see the cluster ({}): it stays",
            view.error.as_deref().unwrap_or("not connected")
        ));
    }
    let me = view.node_id.as_str();
    let others: Vec<&ringrift::protocol::NodeRecord> = view
        .nodes
        .iter()
        .map(|n| &n.record)
        .filter(|r| r.node_id != me)
        .collect();
    // Rank by what every node sees: this node's published record too, not its live figure, or
    // each node would find itself idle longest (its own figure is fresher than the others').
    let Some(mine) = view.nodes.iter().find(|n| n.record.node_id == me) else {
        return Err("idle, but this node's record is not in the cluster view yet".into());
    };
    let my_cost = mine.record.cost_per_hour.unwrap_or(0.0);
    let my_idle = mine.record.idle_secs.unwrap_or(idle_secs);
    let ahead = |r: &ringrift::protocol::NodeRecord| {
        let (cost, idle) = (r.cost_per_hour.unwrap_or(0.0), r.idle_secs.unwrap_or(0.0));
        cost > my_cost
            || (cost == my_cost && (idle > my_idle || (idle == my_idle && *r.node_id < *me)))
    };
    // One at a time: a node ahead that is leaving (until its record expires) or idle long
    // enough goes first.
    if let Some(first) = others
        .iter()
        .find(|r| (r.leaving || r.idle_secs.is_some_and(|i| i >= need_secs)) && ahead(r))
    {
        return Err(format!(
            "idle, but node {} (cost {}/h, idle {:.0}s{}) goes first",
            first.node_id,
            first.cost_per_hour.unwrap_or(0.0),
            first.idle_secs.unwrap_or(0.0),
            if first.leaving { ", leaving" } else { "" }
        ));
    }
    let staying = others.iter().filter(|r| !r.leaving).count();
    if (staying as u64) < min_nodes {
        return Err(format!(
            "idle, but only {staying} other node(s) would stay (min_nodes {min_nodes})"
        ));
    }
    Ok(())
}

/// How long a node's intent to leave must have been visible in its own record before it fires:
/// three of the slowest heartbeat of the cluster, so every other node's view has it.
pub(crate) fn settle_secs(view: &ringrift::protocol::ClusterReport) -> f64 {
    3.0 * view
        .nodes
        .iter()
        .map(|n| n.record.heartbeat_secs)
        .fold(0.0, f64::max)
}

#[derive(Default)]
struct IdleShutdown {
    command: Vec<String>,
    idle_minutes: f64,
    threshold: f64,
    socket: Option<PathBuf>,
    last_cpu: Option<(CpuTimes, f64)>,
    tracker: IdleTracker,
    idle_secs: f64,
    cpu: Option<f64>,
    jobs: Option<usize>,
    fired: Option<String>,
    samples: u64,
    error: Option<String>,
    min_nodes: u64,
    /// Why this idle node does not leave yet (the cluster needs it, or another goes first).
    waiting: Option<String>,
    /// In a cluster: this node intends to leave (published as `leaving` in its record).
    leaving: bool,
    /// When this node first saw its intent in its own record (local unix seconds).
    intent_seen: Option<f64>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl IdleShutdown {
    fn report(&self) -> Report {
        let message = if self.command.is_empty() {
            "no shutdown_command configured: this node is never shut down".to_string()
        } else if let Some(f) = &self.fired {
            f.clone()
        } else if let Some(w) = &self.waiting {
            w.clone()
        } else {
            format!(
                "idle for {:.0}s of {:.0}s needed (cpu {}%, jobs {}); then runs: {}",
                self.idle_secs,
                self.idle_minutes * 60.0,
                self.cpu
                    .map(|c| format!("{c:.1}"))
                    .unwrap_or_else(|| "?".into()),
                self.jobs
                    .map(|j| j.to_string())
                    .unwrap_or_else(|| "?".into()),
                self.command.join(" ")
            )
        };
        let healthy = self.error.is_none();
        let message = match &self.error {
            Some(e) => format!("{message}; {e}"),
            None => message,
        };
        let details = BTreeMap::from([
            ("idle_secs".to_string(), json!(self.idle_secs)),
            ("cpu_percent".to_string(), json!(self.cpu)),
            ("jobs_running".to_string(), json!(self.jobs)),
            ("shutdown_command".to_string(), json!(self.command)),
            ("leaving".to_string(), json!(self.leaving)),
        ]);
        Report::new(healthy, message, details, [("samples", self.samples)])
    }

    async fn sample(&mut self) {
        let t = now();
        let cur = procfs::cpu_times();
        let (cpu, start) = match (&cur, self.last_cpu) {
            (Ok(c), Some((prev, at))) => (cpu_percent(&prev, c), at),
            _ => (None, t),
        };
        if let Ok(c) = cur {
            self.last_cpu = Some((c, t));
        }
        self.jobs = match &self.socket {
            Some(s) => match crate::unified_node_health::supervisor_status(s).await {
                Ok(r) => Some(r.jobs.len()),
                Err(e) => {
                    self.error = Some(format!("cannot read the supervisor's jobs: {e:#}"));
                    None
                }
            },
            None => None,
        };
        self.cpu = cpu;
        self.samples += 1;
        let idle = node_idle(cpu, self.jobs, self.threshold);
        self.idle_secs = self.tracker.observe(start, t, idle);
    }

    async fn shut_down(&mut self) {
        println!(
            "{NAME}: idle for {:.0}s: running {}",
            self.idle_secs,
            self.command.join(" ")
        );
        let mut cmd = tokio::process::Command::new(&self.command[0]);
        cmd.args(&self.command[1..]).kill_on_drop(true);
        let when = ringrift::timefmt::now_rfc3339();
        self.fired = Some(
            match tokio::time::timeout(COMMAND_TIMEOUT, cmd.status()).await {
                Ok(Ok(s)) if s.success() => format!(
                    "shutdown command ran at {when} after {:.0}s idle",
                    self.idle_secs
                ),
                Ok(Ok(s)) => {
                    self.error = Some(format!("the shutdown command failed: {s}"));
                    format!("shutdown command ran at {when}")
                }
                Ok(Err(e)) => {
                    self.error = Some(format!("cannot run the shutdown command: {e}"));
                    format!("shutdown command could not start at {when}")
                }
                Err(_) => {
                    self.error = Some(format!(
                        "the shutdown command did not finish within {COMMAND_TIMEOUT:?}"
                    ));
                    format!("shutdown command timed out at {when}")
                }
            },
        );
        println!("{NAME}: {}", self.fired.as_deref().unwrap_or(""));
    }
}

impl Daemon for IdleShutdown {
    fn name(&self) -> &str {
        NAME
    }

    fn start<'a>(&'a mut self, _ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        Box::pin(async move {
            let s = crate::pipeline::typed(
                settings,
                ringrift::settings::IdleShutdownSettings::from_map,
            )?;
            self.idle_minutes = s.idle_minutes;
            self.threshold = s.cpu_threshold;
            self.min_nodes = s.min_nodes;
            self.command = s.shutdown_command;
            self.socket = std::env::var_os(SOCKET_ENV).map(PathBuf::from);
            println!(
                "{NAME}: {}",
                if self.command.is_empty() {
                    "no shutdown_command configured: never shutting this node down".to_string()
                } else {
                    format!(
                        "after {} min under {}% CPU with no jobs: {}",
                        self.idle_minutes,
                        self.threshold,
                        self.command.join(" ")
                    )
                }
            );
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            if self.command.is_empty() || self.fired.is_some() {
                return self.report();
            }
            self.error = None;
            self.waiting = None;
            self.sample().await;
            let need = self.idle_minutes * 60.0;
            if self.idle_secs < need {
                (self.leaving, self.intent_seen) = (false, None);
                return self.report();
            }
            // In a cluster (the supervisor keeps run/cluster.json; the daemon's working
            // directory is the root), the cluster decides whether this node goes, and when.
            let Some(view) = crate::pipeline::transfer::cluster_view(std::path::Path::new("."))
            else {
                self.shut_down().await;
                return self.report();
            };
            if let Err(why) = may_leave(&view, self.idle_secs, need, self.min_nodes) {
                (self.leaving, self.intent_seen) = (false, None);
                self.waiting = Some(why);
                return self.report();
            }
            self.leaving = true;
            let published = view
                .nodes
                .iter()
                .any(|n| n.record.node_id == view.node_id && n.record.leaving);
            let t = now();
            let seen = if published {
                *self.intent_seen.get_or_insert(t)
            } else {
                self.intent_seen = None;
                t
            };
            let settle = settle_secs(&view);
            if published && t - seen >= settle {
                self.shut_down().await;
            } else {
                self.waiting = Some(format!(
                    "idle: leaving once every node has seen it ({:.1}s of {settle:.1}s)",
                    t - seen
                ));
            }
            self.report()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        me: &str,
        nodes: &[(&str, Option<f64>, Option<f64>)],
    ) -> ringrift::protocol::ClusterReport {
        let nodes = nodes
            .iter()
            .map(|(id, cost, idle)| {
                let mut record: ringrift::protocol::NodeRecord = serde_json::from_value(json!({
                    "node_id": id, "roles": [], "version": "0", "cores": 1, "memory_bytes": 1,
                    "gpus": 0, "free_disk_bytes": 1, "daemons": {}, "jobs": 0, "updated_unix": 0.0
                }))
                .unwrap();
                record.cost_per_hour = *cost;
                record.idle_secs = *idle;
                ringrift::protocol::NodeStatus {
                    last_seen_secs: 0.0,
                    record,
                }
            })
            .collect();
        ringrift::protocol::ClusterReport {
            node_id: me.into(),
            connected: true,
            error: None,
            nodes,
            leases: Default::default(),
        }
    }

    #[test]
    fn the_costliest_idle_node_leaves_first_and_min_nodes_stay() {
        let three = [
            ("a", Some(1.0), Some(100.0)),
            ("b", Some(3.0), Some(100.0)),
            ("c", Some(2.0), Some(100.0)),
        ];
        // b is the costliest idle node: it goes; a and c wait for it.
        assert_eq!(may_leave(&view("b", &three), 100.0, 60.0, 1), Ok(()));
        let e = may_leave(&view("c", &three), 100.0, 60.0, 1).unwrap_err();
        assert!(e.contains("node b (cost 3/h"), "{e}");
        // A costlier node that is not idle long enough does not hold the others back.
        let busy_b = [three[0], ("b", Some(3.0), Some(5.0)), three[2]];
        assert_eq!(may_leave(&view("c", &busy_b), 100.0, 60.0, 1), Ok(()));
        // Unknown idleness (no unified_idle_shutdown there) is not idle.
        let unknown_b = [three[0], ("b", Some(3.0), None), three[2]];
        assert_eq!(may_leave(&view("c", &unknown_b), 100.0, 60.0, 1), Ok(()));
        // Equal costs: the one idle longest, then the smaller id.
        let even = [("a", None, Some(100.0)), ("b", None, Some(200.0))];
        assert!(may_leave(&view("a", &even), 100.0, 60.0, 0).is_err());
        assert_eq!(may_leave(&view("b", &even), 200.0, 60.0, 0), Ok(()));
        // min_nodes: with two nodes and min_nodes 2, nobody leaves.
        let e = may_leave(&view("b", &three[..2]), 100.0, 60.0, 2).unwrap_err();
        assert!(
            e.contains("only 1 other node(s) would stay (min_nodes 2)"),
            "{e}"
        );
        // One at a time: b, ahead and leaving, goes first (until its record expires)...
        let mut b_leaves = view("c", &three);
        b_leaves.nodes[1].record.leaving = true;
        let e = may_leave(&b_leaves, 100.0, 60.0, 1).unwrap_err();
        assert!(
            e.contains("node b (cost 3/h, idle 100s, leaving) goes first"),
            "{e}"
        );
        // ... and a node behind that says it is leaving counts as gone for min_nodes.
        let mut a_leaves = view("b", &three);
        a_leaves.nodes[0].record.leaving = true;
        assert_eq!(may_leave(&a_leaves, 100.0, 60.0, 1), Ok(()));
        let e = may_leave(&a_leaves, 100.0, 60.0, 2).unwrap_err();
        assert!(e.contains("only 1 other node(s) would stay"), "{e}");
        // Equal costs: every node ranks by the published figures, its own too, so they agree.
        let tie = [
            ("x", None, Some(100.0)),
            ("y", None, Some(100.0)),
            ("z", None, Some(100.0)),
        ];
        let firsts: Vec<&str> = ["x", "y", "z"]
            .into_iter()
            .filter(|me| may_leave(&view(me, &tie), 105.0, 60.0, 1).is_ok())
            .collect();
        assert_eq!(
            firsts,
            ["x"],
            "exactly one goes first, whatever its live figure"
        );
        // A node that cannot see the cluster stays.
        let mut cut = view("b", &three);
        cut.connected = false;
        assert!(may_leave(&cut, 100.0, 60.0, 1).is_err());
    }

    #[test]
    fn idle_needs_low_cpu_and_no_jobs() {
        assert!(node_idle(Some(3.0), Some(0), 10.0));
        assert!(!node_idle(Some(30.0), Some(0), 10.0), "busy CPU");
        assert!(!node_idle(Some(3.0), Some(1), 10.0), "a job runs");
        assert!(!node_idle(None, Some(0), 10.0), "no reading yet");
        assert!(!node_idle(Some(3.0), None, 10.0), "jobs unknown");
    }
}
