//! Prometheus text exposition (format 0.0.4) of the status report, written by hand: a few
//! `# HELP`/`# TYPE` lines per family.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ringrift::lifecycle::DaemonState;
use ringrift::pipeline_view::{KeyView, Stage};
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
    out.push_str(&pipeline_metrics(&s.pipeline));
    out
}

/// The per-key view's gauges (`config_key` label), when a pipeline daemon reports one: a key
/// whose fact is unknown (null in `GET /pipeline`) has no sample in that family. `stage` is 1
/// for the key's current stage and 0 for the others (one sample per stage, `idle` included);
/// `stage_active` is 1 for every stage working on the key now.
pub(crate) fn pipeline_metrics(view: &BTreeMap<String, KeyView>) -> String {
    let mut out = String::new();
    if view.is_empty() {
        return out;
    }
    let mut family = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_key = |f: &dyn Fn(&KeyView) -> Option<f64>| -> Vec<(String, f64)> {
        view.iter()
            .filter_map(|(k, v)| Some((format!("{{config_key=\"{}\"}}", escape(k)), f(v)?)))
            .collect()
    };
    let per_stage = |f: &dyn Fn(&KeyView, Stage) -> Option<bool>| -> Vec<(String, f64)> {
        view.iter()
            .flat_map(|(k, v)| {
                Stage::ALL.iter().filter_map(move |st| {
                    let on = f(v, *st)?;
                    Some((
                        format!("{{config_key=\"{}\",stage=\"{st}\"}}", escape(k)),
                        f64::from(u8::from(on)),
                    ))
                })
            })
            .collect()
    };
    family(
        "ringrift_pipeline_generation",
        "models of the key promoted to canonical on this node (the canonical model's generation)",
        per_key(&|v| v.generation.map(|g| g as f64)),
    );
    family(
        "ringrift_pipeline_games",
        "completed games of the key in this node's games DB",
        per_key(&|v| v.games_total.map(|g| g as f64)),
    );
    family(
        "ringrift_pipeline_games_since_export",
        "completed games of the key not yet in an export",
        per_key(&|v| v.games_since_export.map(|g| g as f64)),
    );
    family(
        "ringrift_pipeline_model_age_seconds",
        "seconds since the key's canonical model file was written",
        per_key(&|v| v.model_age_secs),
    );
    family(
        "ringrift_pipeline_last_export_timestamp_seconds",
        "unix time of the key's last export",
        per_key(&|v| v.last_export_at),
    );
    family(
        "ringrift_pipeline_last_promotion_timestamp_seconds",
        "unix time of the key's last promotion on this node",
        per_key(&|v| v.last_promotion.map(|p| p.at)),
    );
    family(
        "ringrift_pipeline_rating_elo",
        "the canonical model's rating (Elo; random play is 0), while it has one",
        per_key(&|v| v.rating),
    );
    family(
        "ringrift_pipeline_stage",
        "1 for the key's current stage (the latest active in pipeline order, or idle)",
        per_stage(&|v, st| Some(v.stage == st)),
    );
    family(
        "ringrift_pipeline_stage_active",
        "1 for each stage working on the key now",
        per_stage(&|v, st| (st != Stage::Idle).then(|| v.stages.contains(&st))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_key_view_is_one_gauge_per_fact_and_stage() {
        assert_eq!(pipeline_metrics(&BTreeMap::new()), "");
        let view: BTreeMap<String, KeyView> = serde_json::from_value(serde_json::json!({
            "hex8_2p": {"generation": 2, "games_total": 1200, "games_since_export": 100,
                        "last_export_at": 1000.5, "model_sha256": "ab", "model_written_at": 900.0,
                        "model_age_secs": 100.5, "stage": "training",
                        "stages": ["selfplay", "training"],
                        "last_promotion": {"at": 900.0, "generation": 2}, "rating": null}
        }))
        .unwrap();
        let text = pipeline_metrics(&view);
        for line in [
            "# TYPE ringrift_pipeline_generation gauge",
            "ringrift_pipeline_generation{config_key=\"hex8_2p\"} 2",
            "ringrift_pipeline_games{config_key=\"hex8_2p\"} 1200",
            "ringrift_pipeline_games_since_export{config_key=\"hex8_2p\"} 100",
            "ringrift_pipeline_model_age_seconds{config_key=\"hex8_2p\"} 100.5",
            "ringrift_pipeline_last_export_timestamp_seconds{config_key=\"hex8_2p\"} 1000.5",
            "ringrift_pipeline_last_promotion_timestamp_seconds{config_key=\"hex8_2p\"} 900",
            "ringrift_pipeline_stage{config_key=\"hex8_2p\",stage=\"training\"} 1",
            "ringrift_pipeline_stage{config_key=\"hex8_2p\",stage=\"idle\"} 0",
            "ringrift_pipeline_stage_active{config_key=\"hex8_2p\",stage=\"selfplay\"} 1",
            "ringrift_pipeline_stage_active{config_key=\"hex8_2p\",stage=\"export\"} 0",
            "# HELP ringrift_pipeline_rating_elo the canonical model's rating (Elo; random play is 0), while it has one",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // No rating yet: the family is there, without a sample.
        assert!(!text.contains("ringrift_pipeline_rating_elo{"), "{text}");
        assert!(!text.contains("stage_active{config_key=\"hex8_2p\",stage=\"idle\"}"));
        assert_eq!(text.matches("ringrift_pipeline_stage{").count(), 6);
    }
}
