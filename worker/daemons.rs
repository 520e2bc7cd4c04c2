//! The daemon catalog as the worker sees it: which name runs which [`Daemon`] implementation.
//!
//! Each entry names the function that builds its daemon; the runtime (worker/runtime.rs) does the
//! rest — handshake, heartbeats, pause, shutdown, events — the same way for all of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use ringrift::protocol::Health;
use serde_json::Value;

use crate::runtime::{Ctx, Settings};
use ringrift::events::Event;

/// A boxed future that need not be `Send`: the worker runs on a current-thread runtime.
pub(crate) type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What a daemon reports after starting and after every cycle; the runtime sends it with each heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub(crate) health: Health,
    /// Monotonic counters beyond `cycles`, which the runtime adds itself.
    pub(crate) counters: BTreeMap<String, u64>,
}

impl Report {
    /// A report whose status word is `ok` when healthy and `degraded` otherwise.
    pub(crate) fn new<const N: usize>(
        healthy: bool,
        message: impl Into<String>,
        details: BTreeMap<String, Value>,
        counters: [(&str, u64); N],
    ) -> Report {
        let status = if healthy { "ok" } else { "degraded" };
        Report::with_status(healthy, status, message, details, counters)
    }

    /// A report with a status word of the daemon's choosing (`idle`, `backpressure`, ...).
    pub(crate) fn with_status<const N: usize>(
        healthy: bool,
        status: impl Into<String>,
        message: impl Into<String>,
        details: BTreeMap<String, Value>,
        counters: [(&str, u64); N],
    ) -> Report {
        Report {
            health: Health {
                healthy,
                status: status.into(),
                message: message.into(),
                details,
            },
            counters: counters
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
        }
    }
}

/// What [`Daemon::start`] returns: the first report, or why start-up failed.
pub(crate) type Start<'a> = LocalBoxFuture<'a, anyhow::Result<Report>>;

/// One kind of daemon. The runtime owns the process's protocol (handshake, heartbeats, pause, shutdown);
/// a daemon only starts and runs cycles.
pub(crate) trait Daemon {
    fn name(&self) -> &str;

    /// One-time start-up, between the INITIALIZING and RUNNING reports. `ctx` is the handle for
    /// emitting events and running jobs, for the daemon to keep.
    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a>;

    /// Runs cycle number `n` (1-based). The runtime keeps heartbeating while the future is pending.
    fn cycle(&mut self, n: u64) -> LocalBoxFuture<'_, Report>;

    /// Event types to receive; the runtime subscribes once the daemon is RUNNING.
    fn subscriptions(&self) -> Vec<String> {
        Vec::new()
    }

    /// Handles one event (never two at once, never during a cycle). The runtime acks it once this
    /// returns; a new report replaces the last one.
    fn on_event(&mut self, _event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async { None })
    }

    /// The last step before the process exits after `shutdown` or SIGTERM, once any cycle or
    /// event in flight has ended (heartbeats go on meanwhile; the supervisor's stop grace bounds
    /// it). For work that must not be lost with the node: the sync daemons push once more.
    fn on_stop(&mut self) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async { None })
    }
}

struct Entry {
    name: &'static str,
    /// One line, from the seed's catalog.
    purpose: &'static str,
    build: fn(&'static str, &'static str) -> Box<dyn Daemon>,
}

const CATALOG: [Entry; 15] = [
    Entry {
        name: "auto_sync",
        purpose: "push-from-generator + gossip replication of game data",
        build: crate::pipeline::auto_sync::build,
    },
    Entry {
        name: "ephemeral_sync",
        purpose: "aggressive 5 s sync for ephemeral hosts",
        build: crate::pipeline::auto_sync::build,
    },
    Entry {
        name: "cluster_data_sync",
        purpose: "P2P mesh data sync",
        build: crate::pipeline::cluster_data_sync::build,
    },
    Entry {
        name: "model_distribution",
        purpose: "model sync after promotion",
        build: crate::pipeline::model_distribution::build,
    },
    Entry {
        name: "training_trigger",
        purpose: "data threshold → training",
        build: crate::pipeline::training_trigger::build,
    },
    Entry {
        name: "auto_export",
        purpose: "games DB → NPZ export",
        build: crate::pipeline::auto_export::build,
    },
    Entry {
        name: "evaluation",
        purpose: "model gauntlet evaluation",
        build: crate::pipeline::evaluation::build,
    },
    Entry {
        name: "auto_promotion",
        purpose: "gauntlet → promotion",
        build: crate::pipeline::auto_promotion::build,
    },
    Entry {
        name: "unified_node_health",
        purpose: "centralized health checks",
        build: crate::unified_node_health::build,
    },
    Entry {
        name: "quality_monitor",
        purpose: "data quality tracking",
        build: crate::pipeline::quality_monitor::build,
    },
    Entry {
        name: "idle_resource",
        purpose: "spawn selfplay on idle GPUs",
        build: crate::pipeline::idle_resource::build,
    },
    Entry {
        name: "unified_idle_shutdown",
        purpose: "cloud instance idle termination",
        build: crate::unified_idle_shutdown::build,
    },
    Entry {
        name: "queue_populator",
        purpose: "maintain work queue",
        build: crate::pipeline::queue_populator::build,
    },
    Entry {
        name: "selfplay_scheduler",
        purpose: "priority-based selfplay allocation",
        build: crate::pipeline::selfplay_scheduler::build,
    },
    Entry {
        name: "job_reaper",
        purpose: "kill stuck processes",
        build: job_reaper,
    },
];

fn job_reaper(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(crate::job_reaper::JobReaperDaemon::default())
}

/// Every daemon name the worker can run, in catalog order.
pub(crate) fn names() -> impl Iterator<Item = &'static str> {
    CATALOG.iter().map(|entry| entry.name)
}

/// Builds the daemon called `name` (either case: `AUTO_SYNC` or `auto_sync`).
pub(crate) fn lookup(name: &str) -> Option<Box<dyn Daemon>> {
    CATALOG
        .iter()
        .find(|entry| entry.name.eq_ignore_ascii_case(name))
        .map(|entry| (entry.build)(entry.name, entry.purpose))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn catalog_has_the_fifteen_seed_names_once_each() {
        let unique: BTreeSet<&str> = names().collect();
        assert_eq!(unique.len(), 15);
        assert_eq!(names().count(), 15);
        assert!(unique.contains("auto_sync"));
        assert!(unique.contains("job_reaper"));
    }

    #[test]
    fn lookup_accepts_either_case_and_refuses_unknown_names() {
        assert_eq!(lookup("AUTO_SYNC").unwrap().name(), "auto_sync");
        assert_eq!(
            lookup("selfplay_scheduler").unwrap().name(),
            "selfplay_scheduler"
        );
        assert!(lookup("auto-sync").is_none());
        assert!(lookup("").is_none());
    }
}
