//! `ringrift-worker fault`: a worker that misbehaves on request, for the supervisor's integration tests.
//!
//! It speaks the normal protocol through [`runtime::run`] (daemon name from `RINGRIFT_DAEMON`) unless
//! `--no-protocol`, and the options combine. Start-up order: `--exit-immediately`, `--grandchild`,
//! `--ignore-sigterm`, `--flood`, then the protocol (or, with `--no-protocol`, nothing), with
//! `--crash-after-ms` (counted from process start) and `--print-every-ms` running alongside.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufWriter, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{SigHandler, Signal};
use ringrift::protocol::DAEMON_ENV;
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{self, Ctx, Quirks, Settings};

/// Length of every `--flood` line, newline included.
const FLOOD_LINE_BYTES: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub(crate) struct FaultArgs {
    /// Exit with status 1 N milliseconds after the process started
    #[arg(long, value_name = "N")]
    pub(crate) crash_after_ms: Option<u64>,

    /// Exit with status 1 at once, before the handshake (a crash loop)
    #[arg(long)]
    pub(crate) exit_immediately: bool,

    /// Once RUNNING, send one heartbeat and then none (the process stays alive and keeps reading)
    #[arg(long)]
    pub(crate) hang: bool,

    /// Keep heartbeating, but never move the progress counters
    #[arg(long)]
    pub(crate) no_progress: bool,

    /// Ignore SIGTERM and the shutdown frame
    #[arg(long)]
    pub(crate) ignore_sigterm: bool,

    /// N milliseconds after RUNNING, report `shutting_down` by itself and then hang (no heartbeat,
    /// no exit; SIGTERM and the shutdown frame ignored): only SIGKILL ends it
    #[arg(long, value_name = "N")]
    pub(crate) hang_shutting_down_after_ms: Option<u64>,

    /// Leave a `sleep 1000` grandchild in the process group and print `grandchild pid N`
    #[arg(long)]
    pub(crate) grandchild: bool,

    /// Write N lines of 100 bytes to stdout as fast as possible, then `flood done`
    #[arg(long, value_name = "N")]
    pub(crate) flood: Option<u64>,

    /// After the welcome, send frames the supervisor must refuse (not JSON, unknown type, oversized)
    #[arg(long)]
    pub(crate) malformed: bool,

    /// Print `tick K` (K = 1, 2, ...) every N milliseconds
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) print_every_ms: Option<u64>,

    /// Once RUNNING, ask the supervisor to run this shell command as a job (`sh -c CMD`)
    #[arg(long, value_name = "CMD")]
    pub(crate) job: Option<String>,

    /// Maximum runtime of the --job, in seconds [default: 60]
    #[arg(long, value_name = "SECS")]
    pub(crate) job_max_runtime: Option<f64>,

    /// Subscribe to this event type (repeatable) and print every event received
    #[arg(long = "subscribe", value_name = "TYPE")]
    pub(crate) subscribe: Vec<String>,

    /// Emit an event of this type once per cycle (see --emit-payload, --emit-count)
    #[arg(long, value_name = "TYPE")]
    pub(crate) emit: Option<String>,

    /// JSON payload of --emit; `{i}` is replaced by the event's number (1, 2, ...) and `{now_us}`
    /// by the unix time in microseconds. Repeat it to send different payloads in turn (the n-th
    /// event takes the n-th, cycling) [default: {}]
    #[arg(long, value_name = "JSON")]
    pub(crate) emit_payload: Vec<String>,

    /// How many events --emit sends in all [default: 1]
    #[arg(long, value_name = "N")]
    pub(crate) emit_count: Option<u64>,

    /// Emit all --emit-count events in the first cycle, as fast as possible (for benchmarks)
    #[arg(long)]
    pub(crate) emit_burst: bool,

    /// Do not connect to the supervisor: a plain process that sleeps until SIGTERM (exit 0)
    #[arg(long)]
    pub(crate) no_protocol: bool,
}

impl FaultArgs {
    fn quirks(&self) -> Quirks {
        Quirks {
            hang: self.hang,
            frozen_progress: self.no_progress,
            ignore_shutdown: self.ignore_sigterm,
            malformed_frames: self.malformed,
            hang_shutting_down_after: self
                .hang_shutting_down_after_ms
                .map(std::time::Duration::from_millis),
        }
    }
}

pub(crate) fn main(args: FaultArgs) -> ExitCode {
    if args.exit_immediately {
        eprintln!("fault: exiting at once (--exit-immediately)");
        return ExitCode::FAILURE;
    }
    let started = std::time::Instant::now();

    if args.grandchild {
        match spawn_grandchild() {
            Ok(pid) => println!("grandchild pid {pid}"),
            Err(e) => {
                eprintln!("fault: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.ignore_sigterm {
        // SAFETY: SIG_IGN installs no handler code, and no other thread exists yet that could be
        // changing signal dispositions. It comes after the grandchild, which keeps the default.
        if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGTERM, SigHandler::SigIgn) } {
            eprintln!("fault: failed to ignore SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(lines) = args.flood
        && let Err(e) = flood(lines)
    {
        eprintln!("fault: flood failed: {e}");
        return ExitCode::FAILURE;
    }

    let target = if args.no_protocol {
        None
    } else {
        match protocol_target() {
            Ok(target) => Some(target),
            Err(e) => {
                eprintln!("fault: {e:#}");
                return ExitCode::from(2);
            }
        }
    };

    let rt = match crate::tokio_runtime("fault") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let crash_at = args
            .crash_after_ms
            .map(|ms| Instant::from_std(started) + Duration::from_millis(ms));
        let main = async {
            match target {
                Some((connection, name)) => {
                    let daemon = Box::new(FaultDaemon {
                        name,
                        subscribe: args.subscribe.clone(),
                        emit_burst: args.emit_burst,
                        emit: args.emit.clone().map(|t| {
                            (
                                t,
                                if args.emit_payload.is_empty() {
                                    vec!["{}".to_string()]
                                } else {
                                    args.emit_payload.clone()
                                },
                                args.emit_count.unwrap_or(1),
                            )
                        }),
                        job: args.job.clone().map(|cmd| {
                            (
                                vec!["sh".to_string(), "-c".to_string(), cmd],
                                args.job_max_runtime.unwrap_or(60.0),
                            )
                        }),
                        ctx: None,
                        emitted: 0,
                    });
                    runtime::run(connection, daemon, args.quirks()).await
                }
                None => plain(args.ignore_sigterm).await,
            }
        };
        tokio::select! {
            code = main => code,
            () = crash(crash_at) => {
                let ms = args.crash_after_ms.unwrap_or_default();
                eprintln!("fault: crashing after {ms} ms (--crash-after-ms)");
                ExitCode::FAILURE
            }
            never = ticks(args.print_every_ms.map(Duration::from_millis)) => match never {},
        }
    })
}

/// The connection and daemon name the supervisor passes at spawn.
fn protocol_target() -> anyhow::Result<(std::os::unix::net::UnixStream, String)> {
    let connection = ringrift::protocol::inherited_connection()
        .map_err(|e| anyhow::anyhow!("{e} (use --no-protocol to run without it)"))?;
    let name = std::env::var(DAEMON_ENV).with_context(|| {
        format!("{DAEMON_ENV} is not set (use --no-protocol to run without it)")
    })?;
    Ok((connection, name))
}

/// `--no-protocol`: nothing to do but wait for SIGTERM (or forever, when it is ignored).
async fn plain(ignore_sigterm: bool) -> ExitCode {
    if ignore_sigterm {
        std::future::pending::<()>().await;
    }
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("fault: failed to install the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    if sigterm.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
    eprintln!("fault: SIGTERM; exiting");
    ExitCode::SUCCESS
}

async fn crash(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn ticks(every: Option<Duration>) -> Infallible {
    let Some(every) = every else {
        return std::future::pending().await;
    };
    let mut timer = tokio::time::interval_at(Instant::now() + every, every);
    let mut count: u64 = 0;
    loop {
        timer.tick().await;
        count += 1;
        println!("tick {count}");
    }
}

/// Starts `sleep 1000` through an intermediate `sh` that exits at once, so the sleep is an orphan in
/// this process group. Its stdout and stderr are this process's stderr (the daemon's log pipe).
fn spawn_grandchild() -> anyhow::Result<u32> {
    let output = Command::new("sh")
        .args(["-c", "sleep 1000 >&2 & echo $!"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run sh for the grandchild")?;
    if !output.status.success() {
        bail!("sh for the grandchild ended with {}", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("sh printed {text:?} instead of the grandchild's pid"))
}

/// Line `i` of `--flood`: `line <i>` padded with `x` to 99 bytes, then a newline.
pub(crate) fn flood_line(i: u64) -> String {
    let mut line = format!("line {i}");
    let width = FLOOD_LINE_BYTES - 1;
    if line.len() < width {
        line.extend(std::iter::repeat_n('x', width - line.len()));
    }
    line.push('\n');
    line
}

/// Writes lines 1..=`lines` and `flood done` in large whole-line chunks.
fn flood(lines: u64) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
    for i in 1..=lines {
        out.write_all(flood_line(i).as_bytes())?;
    }
    out.write_all(b"flood done\n")?;
    out.flush()
}

fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// The daemon the fault worker runs: plain cycles under whatever name the supervisor gave it,
/// plus the event and job behaviour asked for on the command line.
struct FaultDaemon {
    name: String,
    subscribe: Vec<String>,
    /// (type, payload templates taken in turn, how many)
    emit: Option<(String, Vec<String>, u64)>,
    /// (command, max runtime seconds), run once in the first cycle
    job: Option<(Vec<String>, f64)>,
    ctx: Option<Ctx>,
    emitted: u64,
    emit_burst: bool,
}

impl FaultDaemon {
    fn report(cycles: u64) -> Report {
        Report::new(
            true,
            "fault-injection worker",
            BTreeMap::from([("cycles".to_owned(), Value::from(cycles))]),
            [],
        )
    }
}

impl Daemon for FaultDaemon {
    fn name(&self) -> &str {
        &self.name
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            println!(
                "{}: starting fault-injection worker (interval {}s)",
                self.name, settings.interval_secs
            );
            Ok(Self::report(0))
        })
    }

    fn cycle(&mut self, n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            println!("{}: cycle {n} (fault-injection worker)", self.name);
            let ctx = self.ctx.clone().expect("attached before start");
            if let Some((event_type, templates, count)) = &self.emit {
                let batch = if self.emit_burst { *count } else { 1 };
                for _ in 0..batch {
                    if self.emitted >= *count {
                        break;
                    }
                    let template = &templates[(self.emitted as usize) % templates.len()];
                    self.emitted += 1;
                    let text = template
                        .replace("{i}", &self.emitted.to_string())
                        .replace("{now_us}", &unix_micros().to_string());
                    match serde_json::from_str::<Value>(&text) {
                        Ok(payload) => {
                            if !self.emit_burst {
                                println!("{}: emit {event_type} {text}", self.name);
                            }
                            ctx.emit(event_type, payload);
                        }
                        Err(e) => eprintln!("{}: --emit-payload is not JSON: {e}", self.name),
                    }
                }
                if self.emit_burst && self.emitted == *count {
                    println!("{}: emitted {count} events", self.name);
                }
            }
            if let Some((command, max_runtime)) = self.job.take() {
                let outcome = ctx
                    .run_job(
                        command,
                        Duration::from_secs_f64(max_runtime),
                        BTreeMap::new(),
                    )
                    .await;
                println!(
                    "{}: job {} ended: {}; timed out: {}; ran {:.3}s",
                    self.name,
                    outcome.job_id,
                    outcome.exit,
                    outcome.timed_out,
                    outcome.runtime_secs
                );
            }
            Self::report(n)
        })
    }

    fn subscriptions(&self) -> Vec<String> {
        self.subscribe.clone()
    }

    fn on_event(&mut self, event: ringrift::events::Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            println!(
                "{}: event seq={} id={} type={} source={} recv_us={} payload={}",
                self.name,
                event.seq,
                event.id,
                event.event_type,
                event.source,
                unix_micros(),
                event.payload
            );
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_lines_are_100_bytes_and_numbered() {
        let first = flood_line(1);
        assert_eq!(first.len(), 100);
        assert!(first.starts_with("line 1x"));
        assert!(first.ends_with("xx\n"));
        assert_eq!(first.trim_end_matches('\n').trim_end_matches('x'), "line 1");
        let big = flood_line(123_456_789);
        assert_eq!(big.len(), 100);
        assert!(big.starts_with("line 123456789x"));
    }

    #[test]
    fn options_map_onto_runtime_quirks() {
        let args = FaultArgs {
            hang: true,
            no_progress: true,
            ignore_sigterm: true,
            malformed: true,
            hang_shutting_down_after_ms: Some(250),
            ..FaultArgs::default()
        };
        assert_eq!(
            args.quirks(),
            Quirks {
                hang: true,
                frozen_progress: true,
                ignore_shutdown: true,
                malformed_frames: true,
                hang_shutting_down_after: Some(std::time::Duration::from_millis(250)),
            }
        );
        assert_eq!(FaultArgs::default().quirks(), Quirks::default());
    }

    #[test]
    fn grandchild_outlives_its_parent_shell() {
        let pid = spawn_grandchild().unwrap();
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        // Alive (the shell is gone), and in our process group.
        assert_eq!(nix::sys::signal::kill(pid, None), Ok(()));
        assert_eq!(nix::unistd::getpgid(Some(pid)), Ok(nix::unistd::getpgrp()));
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
    }
}
