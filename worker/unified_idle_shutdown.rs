//! UNIFIED_IDLE_SHUTDOWN: terminates a rented cloud instance that has nothing to do, so an idle
//! node stops costing money.
//!
//! It only acts when `shutdown_command` is configured (it is off by default and the daemon is
//! disabled in the default configuration). The node counts as idle when its CPU stays under
//! `cpu_threshold` percent AND the supervisor runs no job, continuously for `idle_minutes`; then the
//! command runs once (with a timeout), and its outcome goes to the daemon's health and log. Any busy
//! sample starts the idle clock over.

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
            self.sample().await;
            if self.idle_secs >= self.idle_minutes * 60.0 {
                self.shut_down().await;
            }
            self.report()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_needs_low_cpu_and_no_jobs() {
        assert!(node_idle(Some(3.0), Some(0), 10.0));
        assert!(!node_idle(Some(30.0), Some(0), 10.0), "busy CPU");
        assert!(!node_idle(Some(3.0), Some(1), 10.0), "a job runs");
        assert!(!node_idle(None, Some(0), 10.0), "no reading yet");
        assert!(!node_idle(Some(3.0), None, 10.0), "jobs unknown");
    }
}
