//! Every type that crosses `run/supervisor.sock`.
//!
//! The wire format is newline-delimited JSON: one object per line, tagged by `"type"` in snake_case.
//! The first frame from any client (worker or CLI) is a [`Hello`] ([`Opening`]); the supervisor
//! answers [`FromSupervisor::Welcome`] or an [`FromSupervisor::Error`] and closes. After it, two
//! vocabularies: a worker speaks [`WorkerFrame`]s on the connection it inherited at spawn, a CLI
//! client (or the HTTP server) asks [`Request`]s on the control socket. Every answer the supervisor
//! gives is a [`FromSupervisor`]; a refusal carries an [`ErrorCode`] the CLI maps to its exit code. Frames longer than
//! [`MAX_FRAME_BYTES`] are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lifecycle::DaemonState;

/// Bumped on every incompatible change of the frames below.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted frame, newline excluded: what the supervisor reads from workers and clients.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Longest answer a client reads from the supervisor, newline excluded. A `status` report holds
/// every daemon's last heartbeat (each up to [`MAX_FRAME_BYTES`]), so it can outgrow one frame
/// of the inbound limit; 64 MiB is the bound of a worker's outgoing queue as well.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

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
/// Set on a pipeline job whose kind has its own `stuck_after` (`pipeline.jobs.<kind>`): the
/// seconds without CPU time and output after which job_reaper calls the job stuck (`0`: never).
/// Without it, job_reaper's own `stuck_after` applies.
pub const JOB_STUCK_AFTER_ENV: &str = "RINGRIFT_JOB_STUCK_AFTER";

/// Who speaks on a connection, said in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A daemon's process, on the connection it inherited at spawn.
    Worker,
    /// A client of the control socket: the CLI (or a tool acting like it).
    Cli,
}

/// What a worker says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    /// Starting up: not yet doing its work.
    Initializing,
    /// Doing its work (its dependents may start).
    Running,
    /// Idle after a pause frame, still connected and heartbeating.
    Paused,
    /// Finishing its work before it exits (its grace period starts).
    ShuttingDown,
}

/// A daemon's own account of its health, sent in every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// False when the daemon cannot do its work (a missing input, repeated failures).
    pub healthy: bool,
    /// One word: "ok", "degraded", "idle", "not_implemented", ...
    #[serde(default)]
    pub status: String,
    /// One line for people (`status` and `watch` show it).
    #[serde(default)]
    pub message: String,
    /// Whatever the daemon wants to show (counts, paths, last errors), as JSON values.
    #[serde(default)]
    pub details: BTreeMap<String, Value>,
}

/// The first frame of every connection, worker or CLI: `{"type":"hello",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Opening {
    /// The only opening: who speaks and which protocol version.
    Hello(Hello),
}

/// Who is speaking and which protocol version it speaks. The supervisor answers
/// [`FromSupervisor::Welcome`] or an [`FromSupervisor::Error`] and closes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The version the client speaks; must equal [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Worker or CLI; a worker hello on the control socket is refused.
    pub role: Role,
    /// The daemon a worker runs (workers only; its connection already says which, so a name
    /// that differs is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    /// The sender's pid, for the log (proves nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// What a worker says on its own connection, after its hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerFrame {
    /// The worker's own state changed.
    State(StateReport),
    /// Still alive: health and progress counters.
    Heartbeat(Heartbeat),
    /// Publish an event the daemon may emit.
    Emit(Emit),
    /// The event types this worker wants.
    Subscribe(Subscribe),
    /// Events up to a sequence number are handled.
    Ack(Ack),
    /// Run a command as a job the supervisor owns.
    SpawnJob(SpawnJob),
    /// An operation on the cluster's shared work queue (a node in a cluster only).
    Work(WorkRequest),
}

/// The worker's own view of its state (`lifecycle::apply_report` decides what the supervisor
/// makes of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateReport {
    /// The state it is in now.
    pub state: ReportedState,
    /// Shown as the daemon's health message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Sent every `heartbeat_interval` seconds; its absence for `heartbeat_timeout` seconds is a hang.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Its health now.
    pub health: Health,
    /// Monotonic counters (cycles run, items processed, ...): the stall watchdog watches them move.
    #[serde(default)]
    pub progress: BTreeMap<String, u64>,
}

/// Publish an event (workers, the CLI and HTTP). Validated against the catalog in
/// `ringrift::events`, and against who may emit the type (`events::may_emit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emit {
    /// The event type, as in the catalog (`NEW_GAMES_AVAILABLE`; case and dashes are normalized).
    pub event_type: String,
    /// The event's JSON object, checked against the type's schema (at most `events::MAX_PAYLOAD_BYTES`).
    pub payload: Value,
    /// Ignored, kept so that older clients' frames still decode: the supervisor stamps the
    /// origin itself (the daemon's name, "cli" or "http"), a sender cannot choose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The event types this worker wants; replaces any earlier subscription. Events not yet acked
/// (including those emitted while the daemon was down) are delivered again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// Event types as in the catalog; an unknown one refuses the whole subscription.
    pub event_types: Vec<String>,
}

/// Every event up to and including `seq` has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The sequence number of the last event handled.
    pub seq: u64,
}

/// Ask the supervisor to run a command as a job it owns (own process group or cgroup,
/// `logs/jobs/<id>.log`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnJob {
    /// Chosen by the worker; echoed in `job_started` and `job_exit`.
    pub request_id: u64,
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// The job is stopped (SIGTERM, grace, SIGKILL to its group) after this many seconds.
    pub max_runtime_secs: f64,
    /// Variables added to the job's environment (the tree's own, such as the root, win).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The shared work queue's item this job runs, if it runs one: the supervisor keeps the
    /// item's claim alive while the job runs, and stops the job if the claim is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_item: Option<i64>,
}

/// An operation on the cluster's shared work queue (JetStream, supervisor/cluster/work.rs),
/// answered by [`FromSupervisor::Work`] with the same `request_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkRequest {
    /// Chosen by the worker; echoed in the answer.
    pub request_id: u64,
    /// What to do.
    pub op: WorkOp,
}

/// What a daemon asks of the shared work queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkOp {
    /// Claim up to `max` items of `item_type` (for this node's free slots; fewer or none when
    /// fewer are ready). Answered by [`WorkAnswer::Claimed`].
    Claim {
        /// `selfplay`, `training` or `evaluation`.
        item_type: String,
        /// At most this many (1 to 64).
        max: u32,
    },
    /// The item's job succeeded: it leaves the queue. Answered by [`WorkAnswer::Settled`].
    Complete {
        /// The claimed item.
        item_id: i64,
    },
    /// The item's job failed: it is handed back and redelivered after `backoff_secs` doubled per
    /// earlier attempt, or set aside (dead-lettered, WORK_FAILED) after its last attempt.
    /// Answered by [`WorkAnswer::Settled`].
    Fail {
        /// The claimed item.
        item_id: i64,
        /// Why (the job's last error line, or its exit).
        error: String,
        /// The first retry's delay, seconds.
        backoff_secs: f64,
    },
    /// This node cannot run the item at all (a key it does not play, no export of it here): it
    /// goes back for another node at once, and this does not count as a failed attempt; after
    /// `work_queue::MAX_RELEASES` such hand-backs (no node of the cluster can run it) it is set
    /// aside like a failed one. Answered by [`WorkAnswer::Settled`].
    Release {
        /// The claimed item.
        item_id: i64,
        /// Why this node cannot run it.
        reason: String,
    },
    /// Adds selfplay items until `target` are outstanding (queued or running), spread over the
    /// keys of `weights` by `work_queue::allocate`. Answered by [`WorkAnswer::ToppedUp`].
    TopUp {
        /// Outstanding items wanted.
        target: u64,
        /// Games each new item asks for.
        games_per_item: u64,
        /// Each config key's priority (the scheduler's `priorities.json`).
        weights: BTreeMap<String, f64>,
    },
    /// Takes the claim away from every item claimed longer ago than its type's limit on any
    /// node (its job overran everything a supervisor would allow): the holder, if alive, stops
    /// the job, and the item is redelivered `cluster.work_ack_wait` later. Answered by
    /// [`WorkAnswer::Reaped`].
    Reap {
        /// Seconds since the claim, per item type (`selfplay`, `training`); items of a type not
        /// listed are left alone.
        older_than_secs: BTreeMap<String, f64>,
    },
    /// Queues one item of `item_type` for `config_key`, unless one for that type, key (and
    /// `unique`) is outstanding already (queued or running on any node): how a training node asks
    /// for a training run that any training node may take, or for the evaluation of one of its
    /// candidates that any evaluation node may take. Answered by [`WorkAnswer::Enqueued`].
    Enqueue {
        /// `training` or `evaluation`.
        item_type: String,
        /// The config key it is for.
        config_key: String,
        /// What the item asks for, a JSON object of at most [`MAX_ITEM_CONFIG`] bytes (default
        /// `{"config_key": K}`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<serde_json::Value>,
        /// Queued once per this, not once per key: dot-separated words of `a-z0-9_-` (an
        /// evaluation item: `<node>.<candidate's SHA-256>`). An item with one that was set aside
        /// is not queued again until the operator retries or cancels it (the answer names it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unique: Option<String>,
    },
    /// The daemon holding the item is still at work on it without a job (copying its inputs or
    /// its results): the supervisor does not hand it back as idle for another
    /// `cluster.work_ack_wait`. Answered by [`WorkAnswer::Settled`].
    Progress {
        /// The claimed item.
        item_id: i64,
    },
}

/// The largest `config` a [`WorkOp::Enqueue`] may carry, bytes of JSON.
pub const MAX_ITEM_CONFIG: usize = 4096;

impl WorkOp {
    /// Whether `daemon` may ask this of the shared queue: the daemons whose work it is, as the
    /// catalog of events says who may emit what (`events::may_emit`). Claiming and settling
    /// selfplay items is selfplay_scheduler's, training items training_trigger's (which also
    /// queues them); topping up and reaping is queue_populator's. Err says why not.
    pub fn may_ask(&self, daemon: &str) -> Result<(), String> {
        let owner = match self {
            WorkOp::Claim { item_type, .. } => match item_type.as_str() {
                // Extra selfplay on an idle node comes from the same queue.
                crate::work_queue::SELFPLAY if daemon == "idle_resource" => "idle_resource",
                crate::work_queue::SELFPLAY => "selfplay_scheduler",
                crate::work_queue::TRAINING => "training_trigger",
                crate::work_queue::EVALUATION => "evaluation",
                other => return Err(format!("there are no {other:?} items")),
            },
            // The supervisor checks that the item is this daemon's claim.
            WorkOp::Complete { .. }
            | WorkOp::Fail { .. }
            | WorkOp::Release { .. }
            | WorkOp::Progress { .. } => {
                return Ok(());
            }
            WorkOp::TopUp { .. } | WorkOp::Reap { .. } => "queue_populator",
            WorkOp::Enqueue { item_type, .. } if item_type == crate::work_queue::TRAINING => {
                "training_trigger"
            }
            WorkOp::Enqueue { item_type, .. } if item_type == crate::work_queue::EVALUATION => {
                "evaluation"
            }
            WorkOp::Enqueue { item_type, .. } => {
                return Err(format!("{item_type:?} items are not queued one by one"));
            }
        };
        if daemon == owner {
            Ok(())
        } else {
            Err(format!(
                "only {owner} may ask this of the shared work queue"
            ))
        }
    }
}

/// The answer to a [`WorkOp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum WorkAnswer {
    /// The items claimed (none when nothing is ready).
    Claimed {
        /// Oldest first.
        items: Vec<crate::work_queue::Claimed>,
    },
    /// The item was settled; for a failure, whether it comes back or was set aside.
    Settled {
        /// None for a completion.
        attempt: Option<crate::work_queue::Attempt>,
    },
    /// Items added by a top-up, per config key, and the outstanding items per key after it.
    ToppedUp {
        /// Added now.
        added: BTreeMap<String, u64>,
        /// Queued or running now.
        outstanding: BTreeMap<String, u64>,
    },
    /// A [`WorkOp::Enqueue`] queued this item (None: one was outstanding already, or was set
    /// aside).
    Enqueued {
        /// The new item's id.
        item_id: Option<i64>,
        /// The id of the set-aside item with the same `unique` that kept this one from being
        /// queued (`queue retry` or `queue cancel` it to go on).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set_aside: Option<i64>,
    },
    /// The items whose claims a [`WorkOp::Reap`] took away.
    Reaped {
        /// Their ids.
        items: Vec<i64>,
    },
    /// Not done: the bus is unreachable, the claim was lost, the request was bad.
    Refused {
        /// Why, for the daemon's log and health.
        message: String,
    },
}

/// An operator's request on the work queue of a node in a cluster (`queue ...` asks the
/// supervisor, which reads the shared queue on JetStream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueueRequest {
    /// Items by status (`pending`, `running`, `failed`; all when None), at most `limit` of each.
    List {
        /// One of `pending`, `running`, `failed`.
        #[serde(default)]
        status: Option<String>,
        /// At most this many items per status.
        limit: u64,
    },
    /// One item.
    Show {
        /// Its id.
        id: i64,
    },
    /// Queue a dead-lettered item again, with its attempts reset.
    Retry {
        /// Its id in the dead-letter stream.
        id: i64,
    },
    /// Remove a pending or running item (a running item's job is stopped by its node).
    Cancel {
        /// Its id.
        id: i64,
    },
}

/// What the CLI (and the HTTP server, for its routes) asks the supervisor, after the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// `start`: start daemons and what they depend on.
    Start(StartRequest),
    /// `stop`: stop daemons and their dependents.
    Stop(StopRequest),
    /// `kill`: stop daemons by a signal.
    Kill(KillRequest),
    /// `restart`: stop and start daemons (their dependencies come up too).
    Restart(Targets),
    /// `pause`: pause RUNNING daemons (a pause frame, or a frozen cgroup or SIGSTOP for plain programs).
    Pause(Targets),
    /// `resume`: resume PAUSED daemons.
    Resume(Targets),
    /// `status`: the status report.
    Status(StatusRequest),
    /// `events`: a page of the event history, and with `follow` the stream after it.
    Events(EventsRequest),
    /// `emit` (and `POST /event`): publish an event.
    Emit(Emit),
    /// `reload` (and SIGHUP): read the configuration again and apply what changed.
    Reload,
    /// `shutdown`: stop every daemon and job, then the supervisor.
    Shutdown,
    /// `cluster status`: every node of the cluster as this node sees it.
    ClusterStatus,
    /// `queue ...` on a node in a cluster: the shared work queue.
    Queue(QueueRequest),
}

/// Start daemons (and what they depend on); answered when they are RUNNING or cannot be.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Daemon names as typed (case and dashes are normalized); unknown ones fail the request.
    #[serde(default)]
    pub names: Vec<String>,
    /// Every enabled daemon.
    #[serde(default)]
    pub all: bool,
    /// The daemons of a profile of the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Answer at once instead of waiting until the daemons are RUNNING.
    #[serde(default)]
    pub no_wait: bool,
}

/// Stop daemons (and their dependents, first); answered when they are STOPPED.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Daemon names as typed; unknown ones fail the request.
    #[serde(default)]
    pub names: Vec<String>,
    /// Every daemon.
    #[serde(default)]
    pub all: bool,
    /// Skip the grace period: SIGKILL to each process group at once (dependents too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// Stop daemons by a signal of the caller's choice (SIGKILL when None), sent at once instead of
/// the shutdown frame and SIGTERM; a group still alive after the grace period gets SIGKILL.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Daemon names as typed; unknown ones fail the request.
    pub names: Vec<String>,
    /// A signal name (`TERM`, `SIGINT`) or number; None: SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// The daemons a restart, pause or resume is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Daemon names as typed; unknown ones fail the request.
    pub names: Vec<String>,
}

/// The status of every daemon, or of one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// One daemon (as typed) instead of all; an unknown one is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The event stream: events after `since`, of `types` (all when empty); with `follow` the
/// connection then stays open and receives new events as they are accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// Only events with a sequence number above this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Only these event types (all when empty).
    #[serde(default)]
    pub types: Vec<String>,
    /// Keep the connection open and stream new events after the history.
    #[serde(default)]
    pub follow: bool,
    /// Only the most recent `limit` matching events. Either way an answer is one page (at
    /// most 1,000 events), oldest first; `EndOfEvents::next_since` says where the next begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Request {
    /// The frame's `type`, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Start(_) => "start",
            Request::Stop(_) => "stop",
            Request::Kill(_) => "kill",
            Request::Restart(_) => "restart",
            Request::Pause(_) => "pause",
            Request::Resume(_) => "resume",
            Request::Status(_) => "status",
            Request::Events(_) => "events",
            Request::Emit(_) => "emit",
            Request::Reload => "reload",
            Request::Shutdown => "shutdown",
            Request::ClusterStatus => "cluster_status",
            Request::Queue(_) => "queue",
        }
    }
}

/// Frames sent by the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromSupervisor {
    /// The hello was accepted.
    Welcome {
        /// The supervisor's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// For workers: the daemon's effective configuration.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<Value>,
        /// For a cluster-scoped daemon of a node in a cluster: its leases as the worker starts
        /// (one, or one per config key; standby until this node holds one). Empty: the daemon
        /// acts on its own.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        leases: Vec<LeaseInfo>,
    },
    /// A refusal: the frame or request was not carried out.
    Error {
        /// Why, for programs (the CLI's exit code).
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },

    // ---- supervisor → worker
    /// To a worker: stop taking new work and report PAUSED.
    Pause,
    /// To a worker: take work again and report RUNNING.
    Resume,
    /// To a worker: finish up and exit within the grace period.
    Shutdown,
    /// To a worker: run a cycle now instead of waiting for its interval.
    RunNow,
    /// One event, to a subscribed worker (which acks it) or to a CLI reading the stream.
    Event {
        /// The event as stored.
        event: crate::events::Event,
    },
    /// An emit was accepted (CLI and HTTP emits).
    Emitted {
        /// Its sequence number in the log.
        seq: u64,
        /// Its id (unique across restarts of the supervisor).
        id: String,
        /// Its type, normalized.
        event_type: String,
    },
    /// The end of one page of an event listing (for `follow`, the end of the history before new
    /// events are streamed).
    EndOfEvents {
        /// The newest sequence number in the log (0: none yet).
        last_seq: u64,
        /// More matching events remain: ask again with `since` set to this (a page holds at most
        /// 1,000 events). Absent on the last page; old clients ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_since: Option<u64>,
    },
    /// To a worker: its job was spawned.
    JobStarted {
        /// The worker's `SpawnJob::request_id`.
        request_id: u64,
        /// The job's id (`<daemon>-<n>`).
        job_id: String,
        /// The pid of the job's process (it leads its own process group).
        pid: u32,
    },
    /// To a worker: its job ended (or could not be spawned).
    JobExit {
        /// The worker's `SpawnJob::request_id`.
        request_id: u64,
        /// Empty when the job could not be spawned at all.
        job_id: String,
        /// Exited with code 0 (and was not stopped for overrunning).
        success: bool,
        /// The exit code, when the job exited by itself.
        code: Option<i32>,
        /// "exit 0", "killed by SIGKILL", "cannot spawn ...".
        exit: String,
        /// Stopped by the supervisor for overrunning max_runtime_secs.
        timed_out: bool,
        /// Seconds from spawn to exit.
        runtime_secs: f64,
    },

    // ---- supervisor → CLI
    /// The outcome of a control command, one entry per daemon touched.
    Done {
        /// Every result is ok.
        ok: bool,
        /// One per daemon (and one per name that was refused up front).
        results: Vec<OpResult>,
    },
    /// The answer to a status request.
    Status(StatusReport),
    /// The answer to a cluster status request.
    Cluster(ClusterReport),
    /// To a worker: the answer to its [`WorkRequest`].
    Work {
        /// The request's `request_id`.
        request_id: u64,
        /// What came of it.
        answer: WorkAnswer,
    },
    /// The answer to a [`QueueRequest`]: the items listed, shown or changed.
    QueueItems {
        /// Pending, then running, then failed; newest first within each.
        items: Vec<crate::work_queue::Item>,
        /// For a listing: how many items have each status in the whole queue (`pending`,
        /// `running`, `failed`), not only those listed.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        counts: BTreeMap<String, u64>,
    },
    /// To a cluster-scoped worker: one of its leases changed (it acts, for that lease's config
    /// key or as a whole, only while `leader`).
    Lease(LeaseInfo),
}

/// Why the supervisor refused a frame or a request, or could not do it for one daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The hello's protocol version is not [`PROTOCOL_VERSION`].
    ProtocolMismatch,
    /// A frame that is not JSON, or not a frame of this connection's vocabulary (serde's message
    /// lists the types expected).
    BadFrame,
    /// A frame longer than [`MAX_FRAME_BYTES`].
    FrameTooLarge,
    /// A frame that is well formed but not expected here: a first frame that is not a hello, a
    /// CLI hello on a worker's connection, a worker hello for a process that is gone. (A frame of
    /// the other vocabulary after the hello, such as a worker frame on the control socket, does
    /// not decode: [`ErrorCode::BadFrame`].)
    UnexpectedFrame,
    /// A daemon name that the configuration does not have.
    UnknownDaemon,
    /// A request that cannot be carried out as asked (nothing named, an unknown profile, signal
    /// or event type, a payload that does not match its schema).
    BadRequest,
    /// The supervisor is shutting down and takes no new work.
    ShuttingDown,
    /// The configuration file could not be loaded (reload).
    Config,
    /// The sender may not do this (an event type it does not own, a worker hello on the control socket).
    Forbidden,
    /// The supervisor is at its connection cap; try again later.
    Busy,
    /// The request was carried out, and the daemon did not reach the state asked for (it failed,
    /// stopped, or was still on its way at the request's deadline).
    Failed,
}

impl ErrorCode {
    /// True for codes that mean the caller asked for something wrong (a usage error), as opposed
    /// to a request that was right but did not work out.
    pub fn is_usage(self) -> bool {
        matches!(
            self,
            ErrorCode::UnknownDaemon | ErrorCode::BadRequest | ErrorCode::Config
        )
    }
}

/// What became of one daemon of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpResult {
    /// The daemon (empty for a result about the request as a whole).
    pub name: String,
    /// The daemon reached what was asked.
    pub ok: bool,
    /// Its state now (`RUNNING (pid 42)`), or what went wrong.
    pub message: String,
    /// Why it failed (absent when `ok`; absent from supervisors older than this field, which the
    /// CLI reads as [`ErrorCode::Failed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

impl OpResult {
    /// A daemon that reached what was asked.
    pub fn done(name: impl Into<String>, message: impl Into<String>) -> OpResult {
        OpResult {
            name: name.into(),
            ok: true,
            message: message.into(),
            code: None,
        }
    }

    /// A daemon for which the request failed, and why.
    pub fn failed(
        name: impl Into<String>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> OpResult {
        OpResult {
            name: name.into(),
            ok: false,
            message: message.into(),
            code: Some(code),
        }
    }
}

/// What `status --json` prints and `GET /daemon/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The supervisor itself.
    pub supervisor: SupervisorInfo,
    /// Every daemon of the configuration (and removed ones still stopping), by name.
    pub daemons: Vec<DaemonStatus>,
    /// Jobs running now.
    #[serde(default)]
    pub jobs: Vec<JobStatus>,
    #[serde(default)]
    /// The event log.
    pub events: EventsInfo,
    /// The loop at a glance: one view per config key, merged from what the pipeline daemons
    /// report (see [`crate::pipeline_view`]). Empty when no daemon reports one, and in the
    /// answer to `status NAME` (one daemon).
    #[serde(default)]
    pub pipeline: BTreeMap<String, crate::pipeline_view::KeyView>,
}

/// The event log at a glance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventsInfo {
    /// Sequence number of the newest event (0: none yet).
    pub last_seq: u64,
    /// Events accepted since the supervisor started.
    pub routed: u64,
    /// Events kept in the log for replay (their index is in memory, their bodies on disk).
    pub retained: u64,
    /// The durable event log (`logs/events.log` under the root).
    pub log_path: String,
    /// Damaged event files moved aside when the supervisor started (paths), newest last.
    #[serde(default)]
    pub quarantined: Vec<String>,
}

/// A job running now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's id (`<daemon>-<n>`), also its log name under logs/jobs/.
    pub id: String,
    /// The daemon that asked for it.
    pub daemon: String,
    /// The pid of the job's process (it leads its own process group).
    pub pid: u32,
    /// The command as spawned.
    pub command: Vec<String>,
    /// Seconds since it was spawned.
    pub runtime_secs: f64,
    /// Seconds after which the supervisor stops it.
    pub max_runtime_secs: f64,
    /// The cluster's shared work queue's item it runs, if it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_item: Option<i64>,
}

/// The supervisor process and where it keeps its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorInfo {
    /// The supervisor's pid.
    pub pid: u32,
    /// The root directory it supervises (absolute).
    pub root: String,
    /// Seconds since it started.
    pub uptime_secs: f64,
    /// The configuration file it loaded, or `<embedded default>`.
    pub config_path: String,
    /// The supervisor's version (Cargo package version).
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

/// One daemon as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's name (lower-case identifier, as in the configuration).
    pub name: String,
    /// Its lifecycle state.
    pub state: DaemonState,
    /// Started by `start --all`.
    pub enabled: bool,
    /// "worker" (the built-in ringrift-worker) or "external" (a configured command).
    pub kind: String,
    /// The pid of its process (leader of its process group), while it has one.
    pub pid: Option<u32>,
    /// Seconds since its process was spawned.
    pub uptime_secs: Option<f64>,
    /// Restarts since the supervisor started.
    pub restarts: u32,
    /// Its own health report (protocol daemons), or a fixed one for plain programs.
    pub health: Health,
    /// Seconds since the last heartbeat, for protocol-aware daemons.
    pub heartbeat_age_secs: Option<f64>,
    /// Its progress counters from the last heartbeat.
    pub progress: BTreeMap<String, u64>,
    /// The daemons it depends on.
    pub depends_on: Vec<String>,
    /// How the last process ended ("exit 1", "signal 9 (SIGKILL)"), if one has.
    pub last_exit: Option<String>,
    /// Why the daemon is FAILED, or why it was last restarted.
    pub reason: Option<String>,
    /// CPU seconds and resident memory of the daemon's process.
    #[serde(default)]
    pub cpu_secs: Option<f64>,
    /// Resident memory of its process, bytes.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Event types it subscribed to, and how many matching events it has not acked yet.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Events of its subscriptions it has not acked yet.
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

/// A cluster-scoped daemon's lease, as its worker hears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// This node holds the lease: the daemon acts. Otherwise it stands by.
    pub leader: bool,
    /// The node holding it (None: nobody this node can see).
    #[serde(default)]
    pub holder: Option<String>,
    /// The lease's revision in the KV bucket while this node holds it: the fencing token (0
    /// otherwise). It grows at every renewal and every change of holder.
    #[serde(default)]
    pub token: u64,
    /// For a daemon with a lease per config key (`catalog::LEASE_PER_CONFIG_KEY`): the key.
    /// None: the lease covers the whole daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_key: Option<String>,
    /// When the holder took it: RFC 3339 UTC, as the holder's clock read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl LeaseInfo {
    /// A lease nobody is known to hold yet: how a cluster-scoped daemon starts (fail closed).
    pub fn unknown(config_key: Option<String>) -> LeaseInfo {
        LeaseInfo {
            leader: false,
            holder: None,
            token: 0,
            config_key,
            since: None,
        }
    }

    /// The health message of a daemon standing by: `standby (leader: node-b since <time>)`.
    pub fn standby_message(&self) -> String {
        format!("standby ({})", self.leader_text())
    }

    /// `leader: node-b since <time>`, `leader: none yet`; prefixed with the config key for a
    /// lease per key (`hex8_2p leader: node-b ...`).
    pub fn leader_text(&self) -> String {
        let key = self
            .config_key
            .as_deref()
            .map_or(String::new(), |k| format!("{k} "));
        match (&self.holder, &self.since) {
            (Some(h), Some(since)) => format!("{key}leader: {h} since {since}"),
            (Some(h), None) => format!("{key}leader: {h}"),
            (None, _) => format!("{key}leader: none yet"),
        }
    }
}

/// What `cluster status --json` prints and `GET /cluster/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterReport {
    /// This node's id.
    pub node_id: String,
    /// Connected to the bus now.
    pub connected: bool,
    /// Why the membership is not up to date (cannot connect, the bucket cannot be made), if so.
    #[serde(default)]
    pub error: Option<String>,
    /// Every node with a live record, by id (this one included once it has renewed).
    pub nodes: Vec<NodeStatus>,
    /// Leases of the cluster-scoped daemons this node runs, and their holders (None: free).
    #[serde(default)]
    pub leases: BTreeMap<String, Option<String>>,
}

/// One node of the cluster: its record and how long ago it was renewed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Seconds since the node last renewed its record, by this node's clock.
    pub last_seen_secs: f64,
    /// The record itself.
    #[serde(flatten)]
    pub record: NodeRecord,
}

/// What each node keeps in the membership bucket (`ringrift_nodes`, key = node id), renewed every
/// `cluster.heartbeat_interval`; it expires `cluster.node_expiry` after the last renewal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's id (`cluster.node_id`).
    pub node_id: String,
    /// The parts of the loop it takes part in (`cluster.roles`).
    pub roles: Vec<String>,
    /// Its supervisor's version.
    pub version: String,
    /// Where others reach its HTTP monitoring, if it serves it.
    #[serde(default)]
    pub http: Option<String>,
    /// Where others send it data (`cluster.data_address`): its root as they reach it, a
    /// directory or `host:path`.
    #[serde(default)]
    pub data_address: Option<String>,
    /// What it costs per hour (`cluster.cost_per_hour`), if known.
    #[serde(default)]
    pub cost_per_hour: Option<f64>,
    /// How long it has been idle, seconds, by its unified_idle_shutdown (None when that daemon
    /// does not run there, or cannot tell).
    #[serde(default)]
    pub idle_secs: Option<f64>,
    /// Its unified_idle_shutdown intends to shut it down, or has: the others count it as gone.
    #[serde(default)]
    pub leaving: bool,
    /// Its `cluster.heartbeat_interval`, seconds: how stale its record can be.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: f64,
    /// CPU cores.
    pub cores: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// GPUs that `nvidia-smi -L` lists (0 without nvidia-smi).
    #[serde(default)]
    pub gpus: u32,
    /// Free disk under its root, bytes.
    pub free_disk_bytes: u64,
    /// unified_node_health's verdict when it runs: healthy, and its message.
    #[serde(default)]
    pub health: Option<(bool, String)>,
    /// Its daemons' states, by name.
    pub daemons: BTreeMap<String, DaemonState>,
    /// Jobs running now.
    pub jobs: u32,
    /// Selfplay slots: how many items of the shared work queue its selfplay_scheduler runs at
    /// once (None while that daemon does not run there).
    #[serde(default)]
    pub slots: Option<u32>,
    /// The shared work queue's items whose jobs run there now.
    #[serde(default)]
    pub running_items: Vec<i64>,
    /// When it wrote this record: unix seconds.
    pub updated_unix: f64,
}

fn default_heartbeat_secs() -> f64 {
    2.0
}

/// A daemon's health at a glance: what `status`, `watch` and `GET /daemon/health/NAME` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// RUNNING or PAUSED, and either reporting itself healthy or an external program (which has
    /// no health reporting: alive is all there is to know).
    pub healthy: bool,
    /// One word: the daemon's own (`ok`, `degraded`, `idle`) while it runs, else its state in
    /// lower case (`backoff`, `failed`).
    pub status: String,
    /// The daemon's own message while it runs; else why it is where it is (the reason, how its
    /// last process ended, or `disabled`); empty when there is nothing to add to the state.
    pub message: String,
}

impl DaemonStatus {
    /// The one summary of this daemon's health (see [`Summary`]).
    pub fn summary(&self) -> Summary {
        let alive = matches!(self.state, DaemonState::Running | DaemonState::Paused);
        if alive {
            return Summary {
                healthy: self.health.healthy || self.kind == "external",
                status: self.health.status.clone(),
                message: self.health.message.clone(),
            };
        }
        let message = if self.state.has_process() && !self.health.message.is_empty() {
            // INITIALIZING or SHUTTING_DOWN: what the process itself last said.
            self.health.message.clone()
        } else if let Some(reason) = &self.reason {
            reason.clone()
        } else if self.state.has_process() {
            String::new()
        } else if let Some(exit) = &self.last_exit {
            format!("last process: {exit}")
        } else if !self.enabled {
            "disabled".into()
        } else {
            String::new()
        };
        Summary {
            healthy: false,
            status: self.state.as_str().to_ascii_lowercase(),
            message,
        }
    }
}

/// Splits a byte stream into frames: newline-delimited, at most [`MAX_FRAME_BYTES`] each (or the
/// limit given to [`FrameReader::with_limit`]). The one
/// framing rule of every reader (the supervisor's connections, the worker's, the CLI's); the
/// reading itself is left to the caller, sync or async, which hands over what it has read.
///
/// An oversized frame is dropped as it arrives (memory stays bounded) and reported once its
/// newline comes, with its length, so the stream stays usable.
#[derive(Debug)]
pub struct FrameReader {
    /// Longest accepted frame, bytes.
    limit: usize,
    buf: Vec<u8>,
    /// Bytes of the current frame dropped for being over the limit.
    oversized: usize,
    /// The current frame has been handed out: the next byte starts a new one.
    handed_out: bool,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new()
    }
}

impl FrameReader {
    /// A reader that accepts frames of up to [`MAX_FRAME_BYTES`], with no bytes buffered.
    pub fn new() -> FrameReader {
        FrameReader::with_limit(MAX_FRAME_BYTES)
    }

    /// A reader that accepts frames of up to `limit` bytes (newline excluded), such as
    /// [`MAX_ANSWER_BYTES`] for a client reading the supervisor's answers.
    pub fn with_limit(limit: usize) -> FrameReader {
        FrameReader {
            limit,
            buf: Vec::new(),
            oversized: 0,
            handed_out: false,
        }
    }

    /// Takes bytes from `available` up to and including the first newline. Returns how many
    /// bytes were used (consume that many) and, when a frame ended, the frame (without its
    /// newline) or why it is refused. Call again with the rest.
    pub fn feed(&mut self, available: &[u8]) -> (usize, Option<Result<&[u8], FrameError>>) {
        self.start_over_if_handed_out();
        let (chunk, used, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if self.oversized > 0 || self.buf.len() + chunk.len() > self.limit {
            self.oversized += self.buf.len() + chunk.len();
            self.buf.clear();
            self.buf.shrink_to(64 * 1024);
        } else {
            self.buf.extend_from_slice(chunk);
        }
        if !ended {
            return (used, None);
        }
        self.handed_out = true;
        (used, Some(self.frame()))
    }

    /// At the end of the stream: the unterminated last frame, if there is one.
    pub fn finish(&mut self) -> Option<Result<&[u8], FrameError>> {
        self.start_over_if_handed_out();
        if self.buf.is_empty() && self.oversized == 0 {
            return None;
        }
        self.handed_out = true;
        Some(self.frame())
    }

    /// Reads the next frame from an async reader: Ok(None) at the end of the stream. Cancel-safe
    /// (in `select!`): bytes already read stay in the reader.
    pub async fn read_async<R>(
        &mut self,
        r: &mut R,
    ) -> std::io::Result<Option<Result<&[u8], FrameError>>>
    where
        R: tokio::io::AsyncBufRead + Unpin,
    {
        use tokio::io::AsyncBufReadExt;
        loop {
            let available = r.fill_buf().await?;
            if available.is_empty() {
                return Ok(self.finish());
            }
            let (used, frame) = self.feed(available);
            let ended = frame.is_some();
            r.consume(used);
            if ended {
                return Ok(self.last_frame());
            }
        }
    }

    /// Reads the next frame from a blocking reader: Ok(None) at the end of the stream. A read
    /// timeout of the underlying socket comes back as its io::Error (WouldBlock or TimedOut).
    pub fn read_blocking<R: std::io::BufRead>(
        &mut self,
        r: &mut R,
    ) -> std::io::Result<Option<Result<&[u8], FrameError>>> {
        loop {
            let available = r.fill_buf()?;
            if available.is_empty() {
                return Ok(self.finish());
            }
            let (used, frame) = self.feed(available);
            let ended = frame.is_some();
            r.consume(used);
            if ended {
                return Ok(self.last_frame());
            }
        }
    }

    /// The frame the last [`feed`](Self::feed) or [`finish`](Self::finish) handed out, again
    /// (for callers that must release their reader before they look at it); None if none was.
    pub fn last_frame(&self) -> Option<Result<&[u8], FrameError>> {
        self.handed_out.then(|| self.frame())
    }

    fn start_over_if_handed_out(&mut self) {
        if self.handed_out {
            self.handed_out = false;
            self.buf.clear();
            self.oversized = 0;
        }
    }

    fn frame(&self) -> Result<&[u8], FrameError> {
        match self.oversized {
            0 => Ok(&self.buf),
            n => Err(FrameError::TooLarge(n, self.limit)),
        }
    }
}

/// Errors reading a frame off the wire.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame of this many bytes (newline excluded) is over [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// Not JSON, or not a frame of the vocabulary expected (serde's message).
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Parses one frame (without its newline). Its length was bounded by the [`FrameReader`] that
/// read it.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(line).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The `type` of a frame that is a JSON object with a string `type`, whatever else it holds: for
/// messages about frames that do not decode as what was expected.
pub fn frame_type(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_slice::<Typed>(line).ok().map(|t| t.kind)
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
pub fn inherited_connection() -> Result<std::os::unix::net::UnixStream, InheritedError> {
    use std::os::fd::{FromRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    static TAKEN: AtomicBool = AtomicBool::new(false);
    let text = std::env::var(FD_ENV).map_err(|_| InheritedError::NotSet)?;
    let fd: RawFd = text
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or(InheritedError::NotADescriptor(text))?;
    let mut stat = std::mem::MaybeUninit::<nix::libc::stat>::uninit();
    // SAFETY: fstat only writes into `stat`; a descriptor that is not open makes it fail with EBADF
    // (the raw call, because wrapping an unchecked number in a BorrowedFd would assert it is open).
    if unsafe { nix::libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return Err(InheritedError::NotOpen(fd, std::io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(InheritedError::NotASocket(fd));
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(InheritedError::Taken(fd));
    }
    // SAFETY: the descriptor is open and a socket (checked above), nothing else in this process
    // owns it (the supervisor passed it for this purpose, and TAKEN makes this the only owner).
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &stream,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| InheritedError::Cloexec(fd, e))?;
    Ok(stream)
}

/// Why [`inherited_connection`] found no connection to take.
#[derive(Debug, thiserror::Error)]
pub enum InheritedError {
    #[error(
        "{FD_ENV} is not set: daemons are started by ringrift-supervisor, which hands each its connection"
    )]
    /// The variable is missing: the process was not started by the supervisor.
    NotSet,
    /// The variable is not a number above 2.
    #[error("{FD_ENV}={0} is not a descriptor number above 2")]
    NotADescriptor(String),
    /// No such open descriptor.
    #[error("{FD_ENV}={0}: {1}")]
    NotOpen(i32, std::io::Error),
    /// The descriptor is not a socket.
    #[error("{FD_ENV}={0} is not a socket")]
    NotASocket(i32),
    /// Taken once already by this process.
    #[error("{FD_ENV}={0} was already taken by this process")]
    Taken(i32),
    /// fcntl(F_SETFD) failed.
    #[error("{FD_ENV}={0}: cannot set close-on-exec: {1}")]
    Cloexec(i32, nix::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemons_whose_work_it_is_may_ask_the_shared_queue() {
        let claim = |t: &str| WorkOp::Claim {
            item_type: t.into(),
            max: 1,
        };
        assert!(claim("selfplay").may_ask("selfplay_scheduler").is_ok());
        assert!(claim("selfplay").may_ask("auto_sync").is_err());
        assert!(claim("training").may_ask("training_trigger").is_ok());
        assert!(claim("training").may_ask("selfplay_scheduler").is_err());
        assert!(claim("bogus").may_ask("selfplay_scheduler").is_err());
        let reap = WorkOp::Reap {
            older_than_secs: BTreeMap::new(),
        };
        assert!(reap.may_ask("queue_populator").is_ok());
        assert!(reap.may_ask("job_reaper").is_err());
        let enqueue = |t: &str| WorkOp::Enqueue {
            item_type: t.into(),
            config_key: "hex8_2p".into(),
            config: None,
            unique: None,
        };
        assert!(enqueue("training").may_ask("training_trigger").is_ok());
        assert!(enqueue("selfplay").may_ask("training_trigger").is_err());
        let e = enqueue("training").may_ask("evaluation").unwrap_err();
        assert!(e.contains("only training_trigger"), "{e}");
        assert!(enqueue("evaluation").may_ask("evaluation").is_ok());
        assert!(enqueue("evaluation").may_ask("training_trigger").is_err());
        assert!(claim("evaluation").may_ask("evaluation").is_ok());
        assert!(claim("evaluation").may_ask("auto_promotion").is_err());
        assert!(claim("selfplay").may_ask("idle_resource").is_ok());
        assert!(claim("training").may_ask("idle_resource").is_err());
    }

    #[test]
    fn hello_round_trips_with_type_tag() {
        let hello = Opening::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Worker,
            daemon: Some("auto_sync".into()),
            pid: Some(42),
        });
        let bytes = encode(&hello);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.starts_with(r#"{"type":"hello","protocol":1,"role":"worker""#),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        let back: Opening = decode(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(back, hello);
    }

    #[test]
    fn unknown_type_and_fields_are_refused() {
        assert!(decode::<Request>(br#"{"type":"explode"}"#).is_err());
        assert!(decode::<Request>(br#"{"type":"stop","names":[],"bogus":1}"#).is_err());
        assert!(decode::<Request>(b"not json").is_err());
        assert!(decode::<WorkerFrame>(br#"{"type":"ack","seq":1,"bogus":1}"#).is_err());
        assert!(decode::<Opening>(br#"{"type":"hello","protocol":1,"role":"cli","x":1}"#).is_err());
    }

    #[test]
    fn a_client_reads_answers_larger_than_an_inbound_frame() {
        let mut answer = vec![b' '; MAX_FRAME_BYTES + 1];
        answer.push(b'\n');
        assert!(matches!(
            FrameReader::new().feed(&answer).1,
            Some(Err(FrameError::TooLarge(n, MAX_FRAME_BYTES))) if n == MAX_FRAME_BYTES + 1
        ));
        let mut r = FrameReader::with_limit(MAX_ANSWER_BYTES);
        assert_eq!(
            r.feed(&answer).1.unwrap().unwrap().len(),
            MAX_FRAME_BYTES + 1
        );
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

    #[test]
    fn frames_split_at_newlines_across_reads() {
        let mut r = FrameReader::new();
        let (used, f) = r.feed(b"{\"a\"");
        assert_eq!((used, f.is_none()), (4, true));
        let (used, f) = r.feed(b":1}\n{\"b\":2}\n");
        assert_eq!(used, 4);
        assert_eq!(f.unwrap().unwrap(), b"{\"a\":1}");
        let (used, f) = r.feed(b"{\"b\":2}\n");
        assert_eq!((used, f.unwrap().unwrap()), (8, &b"{\"b\":2}"[..]));
        assert!(r.finish().is_none());
        r.feed(b"tail");
        assert_eq!(r.finish().unwrap().unwrap(), b"tail");
        assert!(r.finish().is_none());
    }

    #[test]
    fn an_oversized_frame_is_dropped_counted_and_the_next_one_reads() {
        let mut r = FrameReader::new();
        let big = vec![b'x'; MAX_FRAME_BYTES];
        assert!(r.feed(&big).1.is_none());
        assert!(r.feed(b"yy").1.is_none());
        assert!(r.buf.capacity() <= 64 * 1024, "memory stays bounded");
        match r.feed(b"z\n").1 {
            Some(Err(FrameError::TooLarge(n, _))) => assert_eq!(n, MAX_FRAME_BYTES + 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.feed(b"{}\n").1.unwrap().unwrap(), b"{}");
    }

    #[test]
    fn requests_and_worker_frames_are_separate_vocabularies() {
        let stop: Request = decode(br#"{"type":"stop","names":["a"],"all":false}"#).unwrap();
        assert_eq!(
            stop,
            Request::Stop(StopRequest {
                names: vec!["a".into()],
                ..Default::default()
            })
        );
        assert_eq!(stop.name(), "stop");
        assert!(decode::<WorkerFrame>(br#"{"type":"stop","names":[]}"#).is_err());
        assert!(decode::<Request>(br#"{"type":"ack","seq":1}"#).is_err());
        let ack: WorkerFrame = decode(br#"{"type":"ack","seq":3}"#).unwrap();
        assert_eq!(ack, WorkerFrame::Ack(Ack { seq: 3 }));
        assert_eq!(encode(&Request::Reload), b"{\"type\":\"reload\"}\n");
        let emit = encode(&Request::Emit(Emit {
            event_type: "X".into(),
            payload: serde_json::json!({}),
            source: None,
        }));
        assert_eq!(
            emit,
            b"{\"type\":\"emit\",\"event_type\":\"X\",\"payload\":{}}\n"
        );
    }

    #[test]
    fn an_op_result_without_a_code_still_decodes() {
        let r: OpResult = serde_json::from_str(r#"{"name":"a","ok":false,"message":"m"}"#).unwrap();
        assert_eq!(r.code, None);
        let f = OpResult::failed("a", ErrorCode::UnknownDaemon, "unknown daemon 'a'");
        let text = serde_json::to_string(&f).unwrap();
        assert!(text.contains(r#""code":"unknown_daemon""#), "{text}");
        assert!(
            !serde_json::to_string(&OpResult::done("a", "RUNNING"))
                .unwrap()
                .contains("code")
        );
        assert!(ErrorCode::UnknownDaemon.is_usage() && !ErrorCode::Failed.is_usage());
    }

    fn daemon(state: DaemonState) -> DaemonStatus {
        DaemonStatus {
            name: "d".into(),
            state,
            enabled: true,
            kind: "worker".into(),
            pid: None,
            uptime_secs: None,
            restarts: 0,
            health: Health::default(),
            heartbeat_age_secs: None,
            progress: BTreeMap::new(),
            depends_on: vec![],
            last_exit: None,
            reason: None,
            cpu_secs: None,
            rss_bytes: None,
            subscriptions: vec![],
            event_backlog: 0,
            containment: None,
            containment_problems: vec![],
        }
    }

    #[test]
    fn one_summary_of_a_daemon() {
        let mut d = daemon(DaemonState::Running);
        d.health = Health {
            healthy: true,
            status: "ok".into(),
            message: "3 cycles".into(),
            details: BTreeMap::new(),
        };
        let s = d.summary();
        assert!(s.healthy);
        assert_eq!((s.status.as_str(), s.message.as_str()), ("ok", "3 cycles"));
        d.state = DaemonState::Backoff;
        d.reason = Some("exit 1".into());
        let s = d.summary();
        assert!(!s.healthy);
        assert_eq!(
            (s.status.as_str(), s.message.as_str()),
            ("backoff", "exit 1")
        );
        let mut d = daemon(DaemonState::Stopped);
        d.last_exit = Some("signal 15 (SIGTERM)".into());
        assert_eq!(d.summary().message, "last process: signal 15 (SIGTERM)");
        let mut d = daemon(DaemonState::Stopped);
        d.enabled = false;
        assert_eq!(d.summary().message, "disabled");
        let mut d = daemon(DaemonState::Running);
        d.kind = "external".into();
        assert!(
            d.summary().healthy,
            "an external program has no health to report"
        );
    }
}
