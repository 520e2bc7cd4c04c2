//! The client side of every command: talk to the supervisor over its socket (booting it when
//! needed) and print what happened in a form a person can read at a glance.

use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringrift::protocol::{
    self, ClusterReport, ErrorCode, EventsRequest, FrameReader, FromSupervisor, Hello, Opening,
    PROTOCOL_VERSION, Request, Role, StatusReport,
};

use crate::paths::Paths;

mod cluster;
mod events;
mod logs;
mod pipeline;
mod queue;
pub(crate) use cluster::cluster_status;
pub(crate) use events::{EventsQuery, print_events};
pub(crate) use logs::show_logs;
pub(crate) use pipeline::reset_backoff;
pub(crate) use queue::{QueueAction, queue, shared_queue};

/// Exit codes: 0 done, 1 an operation failed, 2 bad input (name, config, usage), 3 no supervisor.
pub(crate) const EXIT_FAILED: i32 = 1;
pub(crate) const EXIT_USAGE: i32 = 2;
pub(crate) const EXIT_NOT_RUNNING: i32 = 3;

pub(crate) struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    frames: FrameReader,
    /// The supervisor's answer to our hello has been read.
    welcomed: bool,
}

pub(crate) enum ConnectError {
    /// Nothing listens: no supervisor on this root.
    NotRunning,
    Other(ClientError),
}

/// What went wrong talking to the supervisor.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot send to the supervisor: {0}")]
    Send(std::io::Error),
    #[error("cannot read from the supervisor: {0}")]
    Read(std::io::Error),
    #[error("the supervisor closed the connection")]
    Closed,
    #[error("no answer from the supervisor within {0}s")]
    Timeout(u64),
    #[error("bad answer from the supervisor: {0}")]
    BadAnswer(protocol::FrameError),
    #[error("the supervisor refused this client: {0}")]
    Refused(String),
    #[error("unexpected answer to hello: {0}")]
    UnexpectedHello(String),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// Why a supervisor could not be started in the background.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BootError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot find this program: {0}")]
    Exe(std::io::Error),
    #[error("cannot start the supervisor: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// It exited before answering; `reason` is its first words (boot.log), or where to look.
    #[error("the supervisor exited during start-up ({status}): {reason}")]
    Exited { status: String, reason: String },
    #[error("the supervisor did not answer on {socket} within 15s; see {log}")]
    NoAnswer { socket: String, log: String },
}

impl Client {
    pub(crate) fn connect(paths: &Paths) -> Result<Client, ConnectError> {
        let stream = match UnixStream::connect(&paths.socket) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(ConnectError::NotRunning);
            }
            Err(source) => {
                return Err(ConnectError::Other(ClientError::Connect {
                    path: paths.socket.display().to_string(),
                    source,
                }));
            }
        };
        let writer = stream
            .try_clone()
            .map_err(|e| ConnectError::Other(ClientError::Send(e)))?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            frames: FrameReader::with_limit(protocol::MAX_ANSWER_BYTES),
            welcomed: false,
        };
        // The hello goes out now; its answer is read together with the first request's (one round
        // trip fewer for every command).
        let hello = Opening::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Cli,
            daemon: None,
            pid: Some(std::process::id()),
        });
        client.send(&hello).map_err(ConnectError::Other)?;
        Ok(client)
    }

    /// Sends one frame (the hello, or a request) without waiting for an answer.
    pub(crate) fn send<F: serde::Serialize>(&mut self, frame: &F) -> Result<(), ClientError> {
        self.writer
            .write_all(&protocol::encode(frame))
            .map_err(ClientError::Send)
    }

    /// Reads the next frame, waiting at most `timeout` (forever with None).
    pub(crate) fn next_frame(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<FromSupervisor, ClientError> {
        if !self.welcomed {
            match self.read_frame(Some(timeout.unwrap_or(Duration::from_secs(10))))? {
                FromSupervisor::Welcome { .. } => self.welcomed = true,
                FromSupervisor::Error { message, .. } => {
                    return Err(ClientError::Refused(message));
                }
                other => return Err(ClientError::UnexpectedHello(format!("{other:?}"))),
            }
        }
        self.read_frame(timeout)
    }

    fn read_frame(&mut self, timeout: Option<Duration>) -> Result<FromSupervisor, ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(ClientError::Read)?;
        match self.frames.read_blocking(&mut self.reader) {
            Ok(Some(frame)) => frame
                .and_then(protocol::decode)
                .map_err(ClientError::BadAnswer),
            Ok(None) => Err(ClientError::Closed),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(ClientError::Timeout(
                    timeout.map(|t| t.as_secs()).unwrap_or(0),
                ))
            }
            Err(e) => Err(ClientError::Read(e)),
        }
    }

    /// Sends one request and reads one answer, waiting at most `timeout`.
    pub(crate) fn call(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<FromSupervisor, ClientError> {
        self.send(request)?;
        self.next_frame(Some(timeout))
    }
}

/// Connects, or explains that no supervisor runs on this root.
pub(crate) fn connect_or_explain(paths: &Paths) -> Result<Client, i32> {
    match Client::connect(paths) {
        Ok(c) => Ok(c),
        Err(ConnectError::NotRunning) => {
            eprintln!(
                "error: no supervisor is running on {} (nothing answers on {}); start one with `ringrift-supervisor start --all`",
                paths.root.display(),
                paths.socket.display()
            );
            Err(EXIT_NOT_RUNNING)
        }
        Err(ConnectError::Other(msg)) => {
            eprintln!("error: {msg}");
            Err(EXIT_FAILED)
        }
    }
}

/// Starts a detached supervisor for this root and waits until its socket answers.
pub(crate) fn boot_background(paths: &Paths, config: Option<&Path>) -> Result<Client, BootError> {
    let create = |path: &Path| {
        let path = path.display().to_string();
        move |source| BootError::Create { path, source }
    };
    paths.prepare_dirs().map_err(create(&paths.run_dir))?;
    let exe = std::env::current_exe().map_err(BootError::Exe)?;
    let boot_log = std::fs::File::create(&paths.boot_log).map_err(create(&paths.boot_log))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(&paths.root);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("serve")
        .current_dir(&paths.root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(boot_log);
    // SAFETY: setsid, close_range and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Nothing this CLI inherited (its caller's pipes) goes on into the long-lived
            // supervisor; the supervisor closes whatever still arrives, too (server.rs).
            crate::unix::cloexec_from(3);
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(BootError::Spawn)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match Client::connect(paths) {
            Ok(c) => {
                // Reap it in the background of this short-lived process: it keeps running.
                std::mem::forget(child);
                return Ok(c);
            }
            Err(ConnectError::Other(e)) => return Err(e.into()),
            Err(ConnectError::NotRunning) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&paths.boot_log).unwrap_or_default();
            let reason = match text.trim() {
                "" => format!("see {}", paths.master_log.display()),
                t => t.strip_prefix("error: ").unwrap_or(t).to_string(),
            };
            return Err(BootError::Exited {
                status: status.to_string(),
                reason,
            });
        }
        if Instant::now() > deadline {
            return Err(BootError::NoAnswer {
                socket: paths.socket.display().to_string(),
                log: paths.master_log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The exit code for a refusal or a failed daemon: [`EXIT_USAGE`] when the request itself was wrong
/// (`ErrorCode::is_usage`), [`EXIT_FAILED`] otherwise.
pub(crate) fn exit_code(code: ErrorCode) -> i32 {
    if code.is_usage() {
        EXIT_USAGE
    } else {
        EXIT_FAILED
    }
}

/// Prints the outcome of a control command and returns the exit code.
pub(crate) fn report(answer: &FromSupervisor) -> i32 {
    match answer {
        FromSupervisor::Done { ok, results } => {
            let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
            for r in results {
                let mark = if r.ok { "ok  " } else { "FAIL" };
                if r.name.is_empty() {
                    println!("{mark} {}", r.message);
                } else {
                    println!("{mark} {:width$}  {}", r.name, r.message);
                }
            }
            let worst = results
                .iter()
                .filter(|r| !r.ok)
                .map(|r| exit_code(r.code.unwrap_or(ErrorCode::Failed)))
                .max();
            match worst {
                _ if *ok => 0,
                Some(code) => code,
                None => EXIT_FAILED,
            }
        }
        FromSupervisor::Error { code, message } => {
            eprintln!("error: {message}");
            exit_code(*code)
        }
        other => {
            eprintln!("error: unexpected answer: {other:?}");
            EXIT_FAILED
        }
    }
}

/// One line for the supervisor's own log.
pub(crate) fn summarize(answer: &FromSupervisor) -> String {
    match answer {
        FromSupervisor::Done { ok, results } => {
            let failed: Vec<String> = results
                .iter()
                .filter(|r| !r.ok)
                .map(|r| format!("{}: {}", r.name, r.message))
                .collect();
            if *ok {
                format!("{} daemon(s) up", results.len())
            } else {
                format!("failed: {}", failed.join("; "))
            }
        }
        FromSupervisor::Error { message, .. } => format!("error: {message}"),
        other => format!("{other:?}"),
    }
}

pub(crate) fn print_status(report: &StatusReport) {
    use std::fmt::Write as _;
    // One write for the whole table: a status call is mostly process start-up, keep the rest short.
    let mut out = String::with_capacity(4096);
    let s = &report.supervisor;
    let _ = writeln!(
        out,
        "supervisor pid {}  up {}  root {}  config {}",
        s.pid,
        human_duration(s.uptime_secs),
        s.root,
        s.config_path
    );
    match (s.containment.as_deref(), s.containment_detail.as_deref()) {
        (Some("cgroup"), Some(dir)) => {
            let _ = writeln!(out, "containment: a cgroup per daemon and job under {dir}");
        }
        (Some(kind), detail) => {
            let _ = writeln!(
                out,
                "containment: {kind} ({})",
                detail.unwrap_or("no reason given")
            );
        }
        (None, _) => {}
    }
    if let Some(why) = &s.http_error {
        let _ = writeln!(out, "warning: HTTP monitoring is off: {why}");
    }
    let rows: Vec<[String; 7]> = report
        .daemons
        .iter()
        .map(|d| {
            let health = d.summary().message;
            [
                d.name.clone(),
                d.state.to_string(),
                d.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                d.uptime_secs
                    .map(human_duration)
                    .unwrap_or_else(|| "-".into()),
                d.restarts.to_string(),
                // Short in the table; `status --json` has the full name.
                match (d.pid, d.containment.as_deref()) {
                    (Some(_), Some("process-group+environment")) => "pgroup+env".into(),
                    (Some(_), Some(kind)) => kind.to_string(),
                    _ => "-".into(),
                },
                health,
            ]
        })
        .collect();
    let headers = [
        "NAME",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "CONTAINMENT",
        "HEALTH",
    ];
    let mut widths = headers.map(str::len);
    for r in &rows {
        for (i, cell) in r.iter().enumerate().take(6) {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: [&str; 7]| {
        format!(
            "{:w0$}  {:w1$}  {:>w2$}  {:>w3$}  {:>w4$}  {:w5$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
            w5 = widths[5]
        )
    };
    let _ = writeln!(out, "{}", line(headers));
    for r in &rows {
        let _ = writeln!(
            out,
            "{}",
            line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]]).trim_end()
        );
    }
    for d in &report.daemons {
        for p in &d.containment_problems {
            let _ = writeln!(out, "{}: {p}", d.name);
        }
    }
    for j in &report.jobs {
        let _ = writeln!(
            out,
            "job {} ({}): pid {}, running {} of at most {}: {}",
            j.id,
            j.daemon,
            j.pid,
            human_duration(j.runtime_secs),
            human_duration(j.max_runtime_secs),
            j.command.join(" ")
        );
    }
    if !report.pipeline.is_empty() {
        let _ = writeln!(out, "pipeline (per config key):");
        out.push_str(&table(PIPELINE_HEADERS, &pipeline_rows(&report.pipeline)));
    }
    if !report.events.quarantined.is_empty() {
        let _ = writeln!(
            out,
            "events: damaged data was moved aside at start-up (see logs/master_loop.log): {}",
            report.events.quarantined.join(", ")
        );
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush());
}

/// The columns of the per-key view in `status` and `watch`.
pub(crate) const PIPELINE_HEADERS: [&str; 8] = [
    "KEY",
    "GEN",
    "GAMES",
    "SINCE EXPORT",
    "MODEL AGE",
    "STAGE",
    "LAST PROMOTION",
    "ELO",
];

/// The per-key view as rows under [`PIPELINE_HEADERS`]: `-` for what no daemon reports; the
/// stage, followed by the other active ones (`training+selfplay`); the last promotion as its
/// generation and how long ago (by this machine's clock).
pub(crate) fn pipeline_rows(
    view: &std::collections::BTreeMap<String, ringrift::pipeline_view::KeyView>,
) -> Vec<[String; 8]> {
    let (secs, millis) = ringrift::timefmt::unix_now();
    let now = secs as f64 + f64::from(millis) / 1000.0;
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    view.iter()
        .map(|(key, v)| {
            let others: Vec<&str> = v
                .stages
                .iter()
                .filter(|s| **s != v.stage)
                .map(|s| s.as_str())
                .collect();
            let stage = if others.is_empty() {
                v.stage.to_string()
            } else {
                format!("{}+{}", v.stage, others.join("+"))
            };
            [
                key.clone(),
                or_dash(v.generation.map(|g| g.to_string())),
                or_dash(v.games_total.map(|g| g.to_string())),
                or_dash(v.games_since_export.map(|g| g.to_string())),
                or_dash(v.model_age_secs.map(human_duration)),
                stage,
                or_dash(v.last_promotion.map(|p| {
                    format!(
                        "gen {}, {} ago",
                        p.generation,
                        human_duration((now - p.at).max(0.0))
                    )
                })),
                or_dash(v.rating.map(|r| format!("{r:.0}"))),
            ]
        })
        .collect()
}

pub(crate) fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    if s < 60 {
        format!("{secs:.1}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// A table: the headers, then each row, columns padded to their widest cell (the last column not
/// padded), lines ending in `\n`.
pub(crate) fn table<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut width = headers.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(c);
                l.extend(std::iter::repeat_n(' ', width[i] - c.chars().count() + 2));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(&headers.map(String::from));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}
