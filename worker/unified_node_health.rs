//! UNIFIED_NODE_HEALTH: one place that says whether this node is fit to run the pipeline.
//!
//! Every cycle it checks what makes a node fail in practice — free disk under the root (games and
//! models fill it), available memory, load per core — and the daemons themselves, asking the
//! supervisor for their states over its socket like the CLI does (a FAILED daemon or one that says it
//! is unhealthy makes the node degraded). It publishes NODE_HEALTH_CHANGED when the verdict flips, so
//! schedulers elsewhere can react, and its own health carries every figure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ringrift::lifecycle::DaemonState;
use ringrift::protocol::{
    self, FromSupervisor, Hello, Opening, PROTOCOL_VERSION, ROOT_ENV, Request, Role, SOCKET_ENV,
    StatusReport, StatusRequest,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};

const NAME: &str = "unified_node_health";

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(NodeHealth::default())
}

/// Thresholds from the daemon's settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    pub min_free_disk_gb: f64,
    pub min_available_memory_mb: f64,
    pub max_load_per_core: f64,
    /// The ceiling of the root's disk use (GB); 0 = none.
    pub max_root_gb: f64,
}

/// One look at the node.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Reading {
    pub free_disk_gb: Option<f64>,
    pub available_memory_mb: Option<f64>,
    pub load_per_core: Option<f64>,
    /// Disk space used under the root (GB, allocated blocks, symlinks not followed).
    pub root_used_gb: Option<f64>,
    /// Daemons that are FAILED or report themselves unhealthy, with why.
    pub troubled: Vec<String>,
}

/// The verdict: healthy, and the problems found (empty when healthy). Pure, for tests.
pub(crate) fn judge(r: &Reading, l: &Limits) -> (bool, Vec<String>) {
    let mut problems = Vec::new();
    if let Some(d) = r.free_disk_gb
        && d < l.min_free_disk_gb
    {
        problems.push(format!(
            "{d:.1} GB free on the root's disk (minimum {})",
            l.min_free_disk_gb
        ));
    }
    if let Some(u) = r.root_used_gb
        && l.max_root_gb > 0.0
        && u > l.max_root_gb
    {
        problems.push(format!(
            "the root holds {u:.3} GB (ceiling max_root_gb {}): lower the retention settings (replay_window, games_keep, keep_candidates, keep_backups, job_logs_*)",
            l.max_root_gb
        ));
    }
    if let Some(m) = r.available_memory_mb
        && m < l.min_available_memory_mb
    {
        problems.push(format!(
            "{m:.0} MB memory available (minimum {})",
            l.min_available_memory_mb
        ));
    }
    if let Some(x) = r.load_per_core
        && x > l.max_load_per_core
    {
        problems.push(format!(
            "load {x:.2} per core (maximum {})",
            l.max_load_per_core
        ));
    }
    problems.extend(r.troubled.iter().cloned());
    (problems.is_empty(), problems)
}

/// Daemons that are FAILED, or RUNNING but unhealthy by their own account.
pub(crate) fn troubled(report: &StatusReport) -> Vec<String> {
    report
        .daemons
        .iter()
        .filter(|d| d.name != NAME)
        .filter_map(|d| match d.state {
            DaemonState::Failed => Some(format!(
                "{} FAILED: {}",
                d.name,
                d.reason.clone().unwrap_or_default()
            )),
            DaemonState::Running if !d.health.healthy && d.kind == "worker" => {
                Some(format!("{} unhealthy: {}", d.name, d.health.message))
            }
            _ => None,
        })
        .collect()
}

/// Disk space the files under `root` take (GB: allocated 512-byte blocks, as `du` counts),
/// symlinks not followed, other file systems mounted inside not entered. `None` when the root
/// itself cannot be read; unreadable parts below it are skipped.
fn root_used_gb(root: &Path) -> Option<f64> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(root).ok()?;
    let mut bytes = top.blocks() * 512;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != top.dev() {
                continue;
            }
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Some(bytes as f64 / 1e9)
}

fn free_disk_gb(path: &Path) -> Option<f64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as f64 * st.fragment_size() as f64 / 1e9)
}

/// Asks the supervisor for its status over the control socket, as the CLI does.
pub(crate) async fn supervisor_status(socket: &Path) -> anyhow::Result<StatusReport> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .context("cannot reach the supervisor")?;
    let (read, mut write) = stream.into_split();
    let hello = Opening::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Cli,
        daemon: None,
        pid: Some(std::process::id()),
    });
    let mut out = protocol::encode(&hello);
    out.extend_from_slice(&protocol::encode(
        &Request::Status(StatusRequest::default()),
    ));
    write.write_all(&out).await?;
    let mut reader = tokio::io::BufReader::new(read);
    let mut frames = protocol::FrameReader::with_limit(protocol::MAX_ANSWER_BYTES);
    let mut read_one = async || -> anyhow::Result<FromSupervisor> {
        let frame = frames
            .read_async(&mut reader)
            .await?
            .context("the supervisor closed the connection")?;
        Ok(protocol::decode(frame?)?)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        match read_one().await? {
            FromSupervisor::Welcome { .. } => {}
            other => anyhow::bail!("unexpected answer to hello: {other:?}"),
        }
        read_one().await
    })
    .await
    .context("no answer from the supervisor within 10 s")??;
    match answer {
        FromSupervisor::Status(r) => Ok(r),
        other => anyhow::bail!("unexpected answer to status: {other:?}"),
    }
}

#[derive(Default)]
struct NodeHealth {
    root: PathBuf,
    socket: Option<PathBuf>,
    limits: Option<Limits>,
    ctx: Option<Ctx>,
    last: Option<bool>,
    reading: Reading,
    problems: Vec<String>,
    checks: u64,
    changes: u64,
    when: String,
}

impl NodeHealth {
    fn report(&self) -> Report {
        let healthy = self.last.unwrap_or(true);
        let message = if self.checks == 0 {
            "no check yet".to_string()
        } else if healthy {
            format!(
                "healthy at {}: {} GB disk free, {} GB under the root, {} MB memory available, load {} per core",
                self.when,
                fmt(self.reading.free_disk_gb, 1),
                fmt(self.reading.root_used_gb, 2),
                fmt(self.reading.available_memory_mb, 0),
                fmt(self.reading.load_per_core, 2)
            )
        } else {
            format!("degraded at {}: {}", self.when, self.problems.join("; "))
        };
        Report::new(
            healthy,
            message,
            self.details(),
            [("checks", self.checks), ("changes", self.changes)],
        )
    }

    fn details(&self) -> BTreeMap<String, Value> {
        let mut d = self.details_for(&self.reading, &self.problems);
        d.insert("troubled_daemons".to_string(), json!(self.reading.troubled));
        d
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "?".into())
}

impl Daemon for NodeHealth {
    fn name(&self) -> &str {
        NAME
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            self.root = std::env::var_os(ROOT_ENV)
                .map(PathBuf::from)
                .context("RINGRIFT_ROOT is not set")?;
            self.socket = std::env::var_os(SOCKET_ENV).map(PathBuf::from);
            let s =
                crate::pipeline::typed(settings, ringrift::settings::NodeHealthSettings::from_map)?;
            let limits = Limits {
                min_free_disk_gb: s.min_free_disk_gb,
                min_available_memory_mb: s.min_available_memory_mb,
                max_load_per_core: s.max_load_per_core,
                max_root_gb: s.max_root_gb,
            };
            println!(
                "{NAME}: checking {} every {}s with {limits:?}",
                self.root.display(),
                settings.interval_secs
            );
            self.limits = Some(limits);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as f64;
            let mut reading = Reading {
                free_disk_gb: free_disk_gb(&self.root),
                available_memory_mb: ringrift::procfs::mem_available()
                    .map(|b| b as f64 / 1_048_576.0),
                load_per_core: ringrift::procfs::loadavg().map(|l| l / cores),
                root_used_gb: root_used_gb(&self.root),
                troubled: Vec::new(),
            };
            if let Some(socket) = &self.socket {
                match supervisor_status(socket).await {
                    Ok(status) => reading.troubled = troubled(&status),
                    Err(e) => reading
                        .troubled
                        .push(format!("cannot read the daemons' states: {e:#}")),
                }
            }
            let (healthy, problems) = judge(&reading, self.limits.as_ref().expect("started"));
            self.checks += 1;
            self.when = ringrift::timefmt::now_rfc3339();
            if self.last != Some(healthy) {
                self.changes += 1;
                let message = if healthy {
                    "node healthy".to_string()
                } else {
                    problems.join("; ")
                };
                println!("{NAME}: {message}");
                if let Some(ctx) = &self.ctx {
                    let details =
                        Value::Object(self.details_for(&reading, &problems).into_iter().collect());
                    ctx.emit(
                        "NODE_HEALTH_CHANGED",
                        ringrift::events::payload([
                            ("healthy", healthy.into()),
                            ("message", message.into()),
                            ("details", details),
                        ]),
                    );
                }
            }
            self.last = Some(healthy);
            self.reading = reading;
            self.problems = problems;
            self.report()
        })
    }
}

impl NodeHealth {
    fn details_for(&self, reading: &Reading, problems: &[String]) -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("free_disk_gb".to_string(), json!(reading.free_disk_gb)),
            (
                "available_memory_mb".to_string(),
                json!(reading.available_memory_mb),
            ),
            ("load_per_core".to_string(), json!(reading.load_per_core)),
            ("root_used_gb".to_string(), json!(reading.root_used_gb)),
            ("problems".to_string(), json!(problems)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            min_free_disk_gb: 5.0,
            min_available_memory_mb: 512.0,
            max_load_per_core: 4.0,
            max_root_gb: 10.0,
        }
    }

    #[test]
    fn a_fit_node_is_healthy() {
        let r = Reading {
            free_disk_gb: Some(50.0),
            available_memory_mb: Some(8000.0),
            load_per_core: Some(0.5),
            root_used_gb: Some(9.0),
            troubled: vec![],
        };
        assert_eq!(judge(&r, &limits()), (true, vec![]));
    }

    #[test]
    fn each_limit_is_named_when_crossed() {
        let r = Reading {
            free_disk_gb: Some(1.0),
            available_memory_mb: Some(100.0),
            load_per_core: Some(9.0),
            root_used_gb: Some(11.0),
            troubled: vec!["auto_export FAILED: x".into()],
        };
        let (ok, problems) = judge(&r, &limits());
        assert!(!ok);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(
            problems[0].contains("GB free")
                && problems[1].contains("ceiling max_root_gb 10")
                && problems[2].contains("MB memory")
                && problems[3].contains("per core")
        );
        let no_ceiling = Limits {
            max_root_gb: 0.0,
            ..limits()
        };
        assert_eq!(judge(&r, &no_ceiling).1.len(), 4, "0 is no ceiling");
    }
}
