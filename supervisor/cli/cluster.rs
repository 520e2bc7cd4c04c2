//! `cluster status [--json]`: every node of the cluster as this node sees it.

use super::*;

/// Prints the cluster view; exit 0, or 1 when this node is not connected to the bus (the view
/// then shows what it last knew, and why).
pub(crate) fn cluster_status(client: &mut Client, json: bool) -> i32 {
    let report = match client.call(&Request::ClusterStatus, Duration::from_secs(10)) {
        Ok(FromSupervisor::Cluster(r)) => r,
        Ok(other) => return report(&other),
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    if json {
        let mut text = serde_json::to_string_pretty(&report).expect("the report serializes");
        text.push('\n');
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
    } else {
        print_cluster(&report);
    }
    if report.connected { 0 } else { EXIT_FAILED }
}

fn print_cluster(r: &ClusterReport) {
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "node {}: {}",
        r.node_id,
        match &r.error {
            None => format!("connected, {} node(s)", r.nodes.len()),
            Some(e) => format!("NOT CONNECTED: {e}"),
        }
    );
    let rows: Vec<[String; 10]> = r
        .nodes
        .iter()
        .map(|n| {
            let d = &n.record;
            let running = d
                .daemons
                .values()
                .filter(|s| **s == ringrift::lifecycle::DaemonState::Running)
                .count();
            [
                d.node_id.clone(),
                format!("{:.1}s", n.last_seen_secs),
                d.roles.join(","),
                format!("{running}/{}", d.daemons.len()),
                d.jobs.to_string(),
                // Shared work items (of any type) running there, which.
                if d.running_items.is_empty() {
                    "-".into()
                } else {
                    d.running_items
                        .iter()
                        .map(|i| format!("#{i}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                },
                // Its selfplay_scheduler's slots.
                d.slots.map_or("-".into(), |s| s.to_string()),
                format!(
                    "{}c {:.0}G{}",
                    d.cores,
                    d.memory_bytes as f64 / 1e9,
                    if d.gpus > 0 {
                        format!(" {}gpu", d.gpus)
                    } else {
                        String::new()
                    }
                ),
                format!("{:.0}G", d.free_disk_bytes as f64 / 1e9),
                match &d.health {
                    Some((true, m)) => format!("ok {m}"),
                    Some((false, m)) => format!("UNHEALTHY {m}"),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let headers = [
        "NODE", "SEEN", "ROLES", "RUNNING", "JOBS", "ITEMS", "SLOTS", "CAPACITY", "DISK", "HEALTH",
    ];
    out.push_str(&table(headers, &rows));
    for (daemon, holder) in &r.leases {
        let _ = writeln!(
            out,
            "lease {daemon}: {}",
            holder.as_deref().unwrap_or("free")
        );
    }
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}
