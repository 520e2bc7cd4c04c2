//! Prometheus text exposition (format 0.0.4) of the status report, written by hand: a few
//! `# HELP`/`# TYPE` lines per family.

use std::fmt::Write as _;

use ringrift::lifecycle::DaemonState;
use ringrift::protocol::{ClusterReport, NodeStatus, StatusReport};

/// Prometheus text exposition of the status report.
pub(crate) fn metrics(s: &StatusReport) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let lbl = |d: &str| format!("{{daemon=\"{}\"}}", escape(d));
    const STATES: [DaemonState; 8] = [
        DaemonState::Stopped,
        DaemonState::Waiting,
        DaemonState::Initializing,
        DaemonState::Running,
        DaemonState::Paused,
        DaemonState::ShuttingDown,
        DaemonState::Backoff,
        DaemonState::Failed,
    ];
    family(
        "ringrift_daemon_state",
        "gauge",
        "1 for the state each daemon is in",
        s.daemons
            .iter()
            .flat_map(|d| {
                STATES.iter().map(move |st| {
                    (
                        format!("{{daemon=\"{}\",state=\"{}\"}}", escape(&d.name), st),
                        f64::from(u8::from(d.state == *st)),
                    )
                })
            })
            .collect(),
    );
    family(
        "ringrift_daemon_restarts_total",
        "counter",
        "restarts since the supervisor started",
        s.daemons
            .iter()
            .map(|d| (lbl(&d.name), d.restarts as f64))
            .collect(),
    );
    family(
        "ringrift_daemon_uptime_seconds",
        "gauge",
        "age of the daemon's current process",
        s.daemons
            .iter()
            .filter_map(|d| d.uptime_secs.map(|u| (lbl(&d.name), u)))
            .collect(),
    );
    family(
        "ringrift_daemon_heartbeat_age_seconds",
        "gauge",
        "seconds since the last heartbeat",
        s.daemons
            .iter()
            .filter_map(|d| d.heartbeat_age_secs.map(|u| (lbl(&d.name), u)))
            .collect(),
    );
    family(
        "ringrift_daemon_healthy",
        "gauge",
        "1 when the daemon reports itself healthy",
        s.daemons
            .iter()
            .map(|d| (lbl(&d.name), f64::from(u8::from(d.health.healthy))))
            .collect(),
    );
    family(
        "ringrift_daemon_rss_bytes",
        "gauge",
        "resident memory of the daemon's process",
        s.daemons
            .iter()
            .filter_map(|d| d.rss_bytes.map(|u| (lbl(&d.name), u as f64)))
            .collect(),
    );
    family(
        "ringrift_daemon_cpu_seconds_total",
        "counter",
        "CPU time of the daemon's current process",
        s.daemons
            .iter()
            .filter_map(|d| d.cpu_secs.map(|u| (lbl(&d.name), u)))
            .collect(),
    );
    family(
        "ringrift_event_subscriber_backlog",
        "gauge",
        "events a subscriber has not acked yet",
        s.daemons
            .iter()
            .filter(|d| !d.subscriptions.is_empty())
            .map(|d| (lbl(&d.name), d.event_backlog as f64))
            .collect(),
    );
    family(
        "ringrift_events_routed_total",
        "counter",
        "events accepted since the supervisor started",
        vec![(String::new(), s.events.routed as f64)],
    );
    family(
        "ringrift_events_last_seq",
        "gauge",
        "sequence number of the newest event",
        vec![(String::new(), s.events.last_seq as f64)],
    );
    family(
        "ringrift_jobs_running",
        "gauge",
        "jobs running now",
        vec![(String::new(), s.jobs.len() as f64)],
    );
    family(
        "ringrift_supervisor_uptime_seconds",
        "gauge",
        "seconds since the supervisor started",
        vec![(String::new(), s.supervisor.uptime_secs)],
    );
    out
}

/// The cluster's gauges (`cluster.enabled`): whether this node reaches the bus, and per node
/// (`node` label) how long ago it renewed its record, its running daemons, jobs and free disk.
pub(crate) fn cluster_metrics(c: &ClusterReport) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_node = |f: &dyn Fn(&NodeStatus) -> f64| -> Vec<(String, f64)> {
        c.nodes
            .iter()
            .map(|n| (format!("{{node=\"{}\"}}", escape(&n.record.node_id)), f(n)))
            .collect()
    };
    family(
        "ringrift_cluster_connected",
        "1 when this node reaches the bus and its membership view is current",
        vec![(String::new(), f64::from(u8::from(c.connected)))],
    );
    family(
        "ringrift_cluster_nodes",
        "nodes with a live record in the membership bucket",
        vec![(String::new(), c.nodes.len() as f64)],
    );
    family(
        "ringrift_cluster_node_last_seen_seconds",
        "seconds since the node last renewed its record",
        per_node(&|n| n.last_seen_secs),
    );
    family(
        "ringrift_cluster_node_daemons_running",
        "the node's daemons in RUNNING",
        per_node(&|n| {
            n.record
                .daemons
                .values()
                .filter(|s| **s == DaemonState::Running)
                .count() as f64
        }),
    );
    family(
        "ringrift_cluster_node_jobs_running",
        "jobs running on the node",
        per_node(&|n| f64::from(n.record.jobs)),
    );
    family(
        "ringrift_cluster_node_free_disk_bytes",
        "free disk under the node's root, bytes",
        per_node(&|n| n.record.free_disk_bytes as f64),
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
