//! Every type that crosses `run/supervisor.sock`.
//!
//! The wire format is newline-delimited JSON: one object per line, tagged by `"type"` in snake_case.
//! The first frame from any client (worker or CLI) is [`ToSupervisor::Hello`]; the supervisor answers
//! [`FromSupervisor::Welcome`] or an [`FromSupervisor::Error`] and closes. Frames longer than
//! [`MAX_FRAME_BYTES`] are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lifecycle::DaemonState;

/// Bumped on every incompatible change of the frames below.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted frame, newline excluded.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Environment variable that carries the socket path to workers and external daemons.
pub const SOCKET_ENV: &str = "RINGRIFT_SUPERVISOR_SOCKET";
/// Environment variable that carries, to a protocol-speaking daemon, the number of the descriptor
/// of its own connection to the supervisor: one end of a socket pair the supervisor made for that
/// spawn. Holding it is what makes a process that daemon (a pid or a name it claims proves
/// nothing); the control socket refuses worker hellos.
pub const FD_ENV: &str = "RINGRIFT_SUPERVISOR_FD";
/// Environment variable that carries the daemon's name to its process.
pub const DAEMON_ENV: &str = "RINGRIFT_DAEMON";
/// The root every process of the tree carries: how the reaper tells this root's processes from others.
pub const ROOT_ENV: &str = "RINGRIFT_ROOT";
/// The pid of the supervisor that spawned the process: a process whose supervisor is gone is an orphan.
pub const SUPERVISOR_PID_ENV: &str = "RINGRIFT_SUPERVISOR_PID";
/// Set on job processes: the job's id.
pub const JOB_ID_ENV: &str = "RINGRIFT_JOB_ID";
/// Set on job processes: the unix time (seconds) after which the job is overdue.
pub const JOB_DEADLINE_ENV: &str = "RINGRIFT_JOB_DEADLINE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Worker,
    Cli,
}

/// What a worker says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    Initializing,
    Running,
    Paused,
    ShuttingDown,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    /// One word: "ok", "degraded", "idle", "not_implemented", ...
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub details: BTreeMap<String, Value>,
}

/// Frames sent to the supervisor, by workers and by the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToSupervisor {
    Hello {
        protocol: u32,
        role: Role,
        /// The daemon a worker runs (workers only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        daemon: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },

    // ---- worker → supervisor
    State {
        state: ReportedState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Heartbeat {
        health: Health,
        /// Monotonic counters (cycles run, items processed, ...): the stall watchdog watches them move.
        #[serde(default)]
        progress: BTreeMap<String, u64>,
    },
    /// Publish an event (workers and the CLI). Validated against the catalog in `ringrift::events`.
    Emit {
        event_type: String,
        payload: Value,
        /// Ignored, kept so that older clients' frames still decode: the supervisor stamps the
        /// origin itself (the daemon's name, "cli" or "http"), a sender cannot choose it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// The event types this worker wants; replaces any earlier subscription. Events not yet acked
    /// (including those emitted while the daemon was down) are delivered again.
    Subscribe {
        event_types: Vec<String>,
    },
    /// Every event up to and including `seq` has been handled.
    Ack {
        seq: u64,
    },
    /// Ask the supervisor to run a command as a job it owns (own process group, logs/jobs/<id>.log).
    SpawnJob {
        /// Chosen by the worker; echoed in `job_started` and `job_exit`.
        request_id: u64,
        command: Vec<String>,
        /// The job is stopped (SIGTERM, grace, SIGKILL to its group) after this many seconds.
        max_runtime_secs: f64,
        #[serde(default)]
        env: BTreeMap<String, String>,
    },

    // ---- CLI → supervisor
    Start {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        all: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<String>,
        /// Answer at once instead of waiting until the daemons are RUNNING.
        #[serde(default)]
        no_wait: bool,
    },
    Stop {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        all: bool,
        /// Skip the grace period: SIGKILL to each process group at once (dependents too).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Stop daemons by a signal of the caller's choice (SIGKILL when None), sent at once instead of
    /// the shutdown frame and SIGTERM; a group still alive after the grace period gets SIGKILL.
    Kill {
        names: Vec<String>,
        /// A signal name (`TERM`, `SIGINT`) or number; None: SIGKILL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    Restart {
        names: Vec<String>,
    },
    Pause {
        names: Vec<String>,
    },
    Resume {
        names: Vec<String>,
    },
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The event stream (CLI): events after `since`, of `types` (all when empty); with `follow`
    /// the connection then stays open and receives new events as they are accepted.
    Events {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        #[serde(default)]
        types: Vec<String>,
        #[serde(default)]
        follow: bool,
        /// Only the most recent `limit` matching events. Either way an answer is one page (at
        /// most 1,000 events), oldest first; `EndOfEvents::next_since` says where the next begins.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    Reload,
    Shutdown,
}

/// Frames sent by the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromSupervisor {
    Welcome {
        protocol: u32,
        /// For workers: the daemon's effective configuration.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<Value>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },

    // ---- supervisor → worker
    Pause,
    Resume,
    Shutdown,
    RunNow,
    /// One event, to a subscribed worker (which acks it) or to a CLI reading the stream.
    Event {
        event: crate::events::Event,
    },
    /// An emit was accepted (CLI and HTTP emits).
    Emitted {
        seq: u64,
        id: String,
        event_type: String,
    },
    /// The end of one page of an event listing (for `follow`, the end of the history before new
    /// events are streamed).
    EndOfEvents {
        last_seq: u64,
        /// More matching events remain: ask again with `since` set to this (a page holds at most
        /// 1,000 events). Absent on the last page; old clients ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_since: Option<u64>,
    },
    JobStarted {
        request_id: u64,
        job_id: String,
        pid: u32,
    },
    JobExit {
        request_id: u64,
        /// Empty when the job could not be spawned at all.
        job_id: String,
        success: bool,
        /// The exit code, when the job exited by itself.
        code: Option<i32>,
        /// "exit 0", "killed by SIGKILL", "cannot spawn ...".
        exit: String,
        /// Stopped by the supervisor for overrunning max_runtime_secs.
        timed_out: bool,
        runtime_secs: f64,
    },

    // ---- supervisor → CLI
    /// The outcome of a control command, one entry per daemon touched.
    Done {
        ok: bool,
        results: Vec<OpResult>,
    },
    Status(StatusReport),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    ProtocolMismatch,
    BadFrame,
    FrameTooLarge,
    UnexpectedFrame,
    UnknownDaemon,
    BadRequest,
    ShuttingDown,
    Config,
    /// The sender may not do this (an event type it does not own, a worker hello on the control socket).
    Forbidden,
    /// The supervisor is at its connection cap; try again later.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpResult {
    pub name: String,
    pub ok: bool,
    pub message: String,
}

/// What `status --json` prints and `GET /daemon/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub supervisor: SupervisorInfo,
    pub daemons: Vec<DaemonStatus>,
    /// Jobs running now.
    #[serde(default)]
    pub jobs: Vec<JobStatus>,
    #[serde(default)]
    pub events: EventsInfo,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventsInfo {
    /// Sequence number of the newest event (0: none yet).
    pub last_seq: u64,
    /// Events accepted since the supervisor started.
    pub routed: u64,
    /// Events kept in the log for replay (their index is in memory, their bodies on disk).
    pub retained: u64,
    pub log_path: String,
    /// Damaged event files moved aside when the supervisor started (paths), newest last.
    #[serde(default)]
    pub quarantined: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub daemon: String,
    pub pid: u32,
    pub command: Vec<String>,
    pub runtime_secs: f64,
    pub max_runtime_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorInfo {
    pub pid: u32,
    pub root: String,
    pub uptime_secs: f64,
    pub config_path: String,
    pub version: String,
    /// Where the HTTP server listens, if it does.
    #[serde(default)]
    pub http: Option<String>,
    /// How processes spawned from now on are contained: "cgroup" or "process-group+environment".
    #[serde(default)]
    pub containment: Option<String>,
    /// The cgroup subtree the supervisor owns (cgroup containment), or why there is none.
    #[serde(default)]
    pub containment_detail: Option<String>,
    /// Why HTTP monitoring is off although the configuration enables it (the address could not
    /// be bound: `cannot listen on 127.0.0.1:8770: Address in use (os error 98)`); null otherwise.
    #[serde(default)]
    pub http_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub name: String,
    pub state: DaemonState,
    pub enabled: bool,
    /// "worker" (the built-in ringrift-worker) or "external" (a configured command).
    pub kind: String,
    pub pid: Option<u32>,
    pub uptime_secs: Option<f64>,
    pub restarts: u32,
    pub health: Health,
    /// Seconds since the last heartbeat, for protocol-aware daemons.
    pub heartbeat_age_secs: Option<f64>,
    pub progress: BTreeMap<String, u64>,
    pub depends_on: Vec<String>,
    /// How the last process ended ("exit 1", "signal 9 (SIGKILL)"), if one has.
    pub last_exit: Option<String>,
    /// Why the daemon is FAILED, or why it was last restarted.
    pub reason: Option<String>,
    /// CPU seconds and resident memory of the daemon's process.
    #[serde(default)]
    pub cpu_secs: Option<f64>,
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Event types it subscribed to, and how many matching events it has not acked yet.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    #[serde(default)]
    pub event_backlog: u64,
    /// How the daemon's processes are contained: "cgroup" or "process-group+environment" (for a
    /// daemon without a process: what the next one would get).
    #[serde(default)]
    pub containment: Option<String>,
    /// Configured limits (`memory_max`, `cpu_max`) that could not be applied, and why; and why the
    /// process has no cgroup when the supervisor has a subtree.
    #[serde(default)]
    pub containment_problems: Vec<String>,
}

/// Errors reading a frame off the wire.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Parses one frame (without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, FrameError> {
    if line.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(line.len()));
    }
    serde_json::from_slice(line).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Serializes one frame, newline included.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(frame).expect("protocol frames always serialize");
    out.push(b'\n');
    out
}

/// Takes the connection the supervisor handed this process at spawn (the descriptor named by
/// [`FD_ENV`]) and marks it close-on-exec, so programs the daemon runs do not inherit it. Call once
/// per process.
///
/// Errors: the variable is missing or not a descriptor number, the descriptor is not open, or it is
/// not a Unix socket (the variable came from somewhere else).
pub fn inherited_connection() -> Result<std::os::unix::net::UnixStream, String> {
    use std::os::fd::{FromRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    static TAKEN: AtomicBool = AtomicBool::new(false);
    let text = std::env::var(FD_ENV).map_err(|_| {
        format!("{FD_ENV} is not set: daemons are started by ringrift-supervisor, which hands each its connection")
    })?;
    let fd: RawFd = text
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{FD_ENV}={text} is not a descriptor number above 2"))?;
    let mut stat = std::mem::MaybeUninit::<nix::libc::stat>::uninit();
    // SAFETY: fstat only writes into `stat`; a descriptor that is not open makes it fail with EBADF
    // (the raw call, because wrapping an unchecked number in a BorrowedFd would assert it is open).
    if unsafe { nix::libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return Err(format!(
            "{FD_ENV}={fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fstat succeeded, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(format!("{FD_ENV}={fd} is not a socket"));
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(format!("{FD_ENV}={fd} was already taken by this process"));
    }
    // SAFETY: the descriptor is open and a socket (checked above), nothing else in this process
    // owns it (the supervisor passed it for this purpose, and TAKEN makes this the only owner).
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &stream,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("{FD_ENV}={fd}: cannot set close-on-exec: {e}"))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_with_type_tag() {
        let hello = ToSupervisor::Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Worker,
            daemon: Some("auto_sync".into()),
            pid: Some(42),
        };
        let bytes = encode(&hello);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.starts_with(r#"{"type":"hello","protocol":1,"role":"worker""#),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        let back: ToSupervisor = decode(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(back, hello);
    }

    #[test]
    fn unknown_type_and_fields_are_refused() {
        assert!(decode::<ToSupervisor>(br#"{"type":"explode"}"#).is_err());
        assert!(decode::<ToSupervisor>(br#"{"type":"stop","names":[],"bogus":1}"#).is_err());
        assert!(decode::<ToSupervisor>(b"not json").is_err());
    }

    #[test]
    fn oversized_frames_are_refused_before_parsing() {
        let big = vec![b' '; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode::<ToSupervisor>(&big),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn end_of_events_without_a_cursor_still_decodes() {
        let old: FromSupervisor = decode(br#"{"type":"end_of_events","last_seq":7}"#).unwrap();
        assert_eq!(
            old,
            FromSupervisor::EndOfEvents {
                last_seq: 7,
                next_since: None
            }
        );
        let info: EventsInfo =
            serde_json::from_str(r#"{"last_seq":1,"routed":1,"retained":1,"log_path":"x"}"#)
                .unwrap();
        assert!(info.quarantined.is_empty());
    }

    #[test]
    fn unit_frames_are_bare_type_objects() {
        assert_eq!(encode(&FromSupervisor::Pause), b"{\"type\":\"pause\"}\n");
        let back: FromSupervisor = decode(br#"{"type":"shutdown"}"#).unwrap();
        assert_eq!(back, FromSupervisor::Shutdown);
    }
}
