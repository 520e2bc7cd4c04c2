//! What `status` reports: the daemons, jobs, events and the supervisor itself.

use ringrift::pipeline_view;

use super::*;

impl Core {
    pub(crate) fn status_report(&self) -> StatusReport {
        let now = Instant::now();
        let (ticks, page) = (
            ringrift::procfs::ticks_per_sec() as f64,
            ringrift::procfs::page_size(),
        );
        let daemons = self
            .daemons
            .values()
            .map(|d| {
                let progress = d.progress.clone();
                let process = d.process.as_ref();
                let usage = d
                    .pid()
                    .and_then(ringrift::procfs::stat)
                    .map(|st| (round3(st.cpu_ticks as f64 / ticks), st.rss_pages * page));
                let (subscriptions, event_backlog) = self.events.backlog(&d.cfg.name);
                let mut health = d.health.clone();
                if health.message.is_empty() && !d.cfg.protocol && d.state == DaemonState::Running {
                    health.healthy = true;
                    health.status = "running".into();
                    health.message = "external process (no health reporting)".into();
                }
                DaemonStatus {
                    name: d.cfg.name.clone(),
                    state: d.state,
                    enabled: d.cfg.enabled,
                    kind: if d.cfg.command.is_some() {
                        "external".into()
                    } else {
                        "worker".into()
                    },
                    pid: d.pid(),
                    uptime_secs: process.map(|p| round3((now - p.spawned_at).as_secs_f64())),
                    restarts: d.restarts,
                    health,
                    heartbeat_age_secs: match d.live() {
                        Some(p) if d.cfg.protocol => {
                            p.last_heartbeat.map(|t| round3((now - t).as_secs_f64()))
                        }
                        _ => None,
                    },
                    progress,
                    depends_on: d.cfg.depends_on.clone(),
                    last_exit: d.last_exit.clone(),
                    reason: d.reason.clone(),
                    cpu_secs: usage.map(|u| u.0),
                    rss_bytes: usage.map(|u| u.1),
                    subscriptions,
                    event_backlog,
                    containment: Some(
                        process
                            .map_or(self.containment.kind(), |p| p.unit.kind())
                            .to_string(),
                    ),
                    containment_problems: process
                        .map(|p| {
                            let u = &p.unit;
                            u.why_not.iter().chain(&u.limit_problems).cloned().collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect::<Vec<DaemonStatus>>();
        let pipeline = pipeline_view::merge(
            daemons.iter().map(|d| pipeline_view::Source {
                daemon: &d.name,
                live: d.state.has_process(),
                details: &d.health.details,
            }),
            unix_now_secs(),
        );
        StatusReport {
            supervisor: SupervisorInfo {
                pid: std::process::id(),
                root: self.paths.root.display().to_string(),
                uptime_secs: round3(self.started.elapsed().as_secs_f64()),
                config_path: self
                    .config_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| self.config.source.clone()),
                version: env!("CARGO_PKG_VERSION").to_string(),
                http: self.http_addr.clone(),
                containment: Some(self.containment.kind().to_string()),
                containment_detail: match self.containment.subtree_dir() {
                    Some(dir) => Some(dir.display().to_string()),
                    None => self.containment.why_not.clone(),
                },
                http_error: self.http_error.clone(),
            },
            daemons,
            jobs: self.job_statuses(),
            events: self.events.info(),
            pipeline,
        }
    }
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Now as unix time, seconds (the pipeline view's ages are taken against it).
fn unix_now_secs() -> f64 {
    let (secs, millis) = ringrift::timefmt::unix_now();
    secs as f64 + f64::from(millis) / 1000.0
}
