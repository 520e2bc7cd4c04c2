//! The runtime every daemon shares: the handshake, state reports, heartbeats, the cycle timer, pause,
//! resume, run-now and shutdown.
//!
//! ```text
//! hello → welcome → state INITIALIZING → start-up → state RUNNING → heartbeat (at once, then every
//! heartbeat_interval) and cycles (at once, then every interval) until shutdown / SIGTERM
//! ```
//!
//! A cycle is a future polled by the same `select!` loop that sends heartbeats, so a slow cycle never
//! delays a heartbeat. Losing the supervisor (EOF or an I/O error on the socket) ends the process with
//! status 1: a worker must never outlive the process that owns it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, bail};
use ringrift::protocol::{
    self, Ack, Emit, FromSupervisor, Heartbeat, Hello, LeaseInfo, MAX_FRAME_BYTES, Opening,
    PROTOCOL_VERSION, ReportedState, Role, SpawnJob, StateReport, Subscribe, WorkAnswer, WorkOp,
    WorkRequest, WorkerFrame,
};
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use crate::daemons::{Daemon, LocalBoxFuture, Report};

/// During a burst of events, ack at least every this many.
const ACK_EVERY: usize = 128;

/// Seconds between cycles when the configuration does not say.
const DEFAULT_INTERVAL_SECS: f64 = 60.0;
/// Seconds between heartbeats when the configuration does not say.
const DEFAULT_HEARTBEAT_SECS: f64 = 5.0;

/// The daemon's effective settings, as received in `welcome`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    /// Seconds between cycles, as configured (kept for log lines: `interval 60s`).
    pub(crate) interval_secs: f64,
    pub(crate) interval: Duration,
    pub(crate) heartbeat_interval: Duration,
    /// The whole configuration object, for daemon-specific keys.
    pub(crate) config: Value,
}

impl Settings {
    pub(crate) fn from_config(config: Option<&Value>) -> anyhow::Result<Settings> {
        let (interval_secs, interval) = seconds(config, "interval", DEFAULT_INTERVAL_SECS)?;
        let (_, heartbeat_interval) =
            seconds(config, "heartbeat_interval", DEFAULT_HEARTBEAT_SECS)?;
        Ok(Settings {
            interval_secs,
            interval,
            heartbeat_interval,
            config: config.cloned().unwrap_or(Value::Null),
        })
    }
}

fn seconds(config: Option<&Value>, key: &str, default: f64) -> anyhow::Result<(f64, Duration)> {
    let secs = match config.and_then(|config| config.get(key)) {
        None | Some(Value::Null) => default,
        Some(value) => value.as_f64().with_context(|| {
            format!("config key {key:?} must be a number of seconds, not {value}")
        })?,
    };
    if !(secs.is_finite() && secs > 0.0) {
        bail!("config key {key:?} must be a positive number of seconds, not {secs}");
    }
    let duration = Duration::try_from_secs_f64(secs)
        .with_context(|| format!("config key {key:?} is out of range: {secs}"))?;
    Ok((secs, duration))
}

/// Deliberate misbehaviour, for the fault-injection worker. The default is a well-behaved worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Quirks {
    /// Send the first heartbeat after RUNNING, then no more.
    pub(crate) hang: bool,
    /// Keep sending the progress counters reported at start-up.
    pub(crate) frozen_progress: bool,
    /// Ignore the `shutdown` frame, and install no SIGTERM handler (the caller ignores the signal).
    pub(crate) ignore_shutdown: bool,
    /// Right after `welcome`, send frames the supervisor must refuse.
    pub(crate) malformed_frames: bool,
    /// This long after RUNNING, report `shutting_down` on its own, then hang: no heartbeat, no exit,
    /// SIGTERM and the shutdown frame ignored.
    pub(crate) hang_shutting_down_after: Option<std::time::Duration>,
}

/// What the reader task hands the main loop.
// Frames are moved once, from the reader task to the loop; boxing each would cost more than the copy.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Frame(FromSupervisor),
    /// A line that did not decode; the connection stays usable.
    Bad(String),
    /// The connection is over; the reader task has ended.
    Closed(String),
}

/// The supervisor is gone (or refused us): the worker exits with status 1.
#[derive(Debug)]
struct Gone(String);

/// Work lent the daemon: a cycle (`ack` None) or one event (`ack` its sequence number).
struct Done {
    daemon: Box<dyn Daemon>,
    report: Option<Report>,
    ack: Option<u64>,
}

type InFlight = LocalBoxFuture<'static, Done>;

/// How a job the daemon asked for ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JobOutcome {
    pub job_id: String,
    pub success: bool,
    pub code: Option<i32>,
    pub exit: String,
    pub timed_out: bool,
    pub runtime_secs: f64,
}

/// The daemon's handle on the supervisor: emit events, run jobs. Cheap to clone; frames go out
/// through the runtime's loop, so a daemon never writes to the socket itself.
#[derive(Clone)]
pub(crate) struct Ctx {
    tx: mpsc::UnboundedSender<WorkerFrame>,
    jobs: Rc<RefCell<JobTable>>,
    /// For a daemon with a lease per config key: the keys whose lease this node holds now
    /// (None: the daemon has no such leases and acts for every key).
    leads: Rc<RefCell<Option<BTreeSet<String>>>>,
    /// Events that have arrived and wait for the daemon: handled between cycles, or taken by a
    /// long cycle itself ([`Ctx::take_event`]).
    inbox: Rc<RefCell<VecDeque<ringrift::events::Event>>>,
    /// The daemon is stopping, paused or standing by: a long cycle takes no new work.
    winding_down: Rc<std::cell::Cell<bool>>,
    /// A report the daemon published during a long cycle, for the next heartbeat.
    interim: Rc<RefCell<Option<Report>>>,
}

#[derive(Default)]
struct JobTable {
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<JobOutcome>>,
    /// Shared work queue requests waiting for their answer (ids from `next` too).
    work: BTreeMap<u64, oneshot::Sender<WorkAnswer>>,
}

impl JobTable {
    /// The next request id (one sequence for jobs and work requests).
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

impl Ctx {
    fn new() -> (Ctx, mpsc::UnboundedReceiver<WorkerFrame>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Ctx {
                tx,
                jobs: Rc::default(),
                leads: Rc::default(),
                inbox: Rc::default(),
                winding_down: Rc::default(),
                interim: Rc::default(),
            },
            rx,
        )
    }

    /// True when this node may act for `config_key`: always, unless the daemon has a lease per
    /// config key (`catalog::LEASE_PER_CONFIG_KEY`) and another node holds this key's.
    pub(crate) fn leads(&self, config_key: &str) -> bool {
        self.leads
            .borrow()
            .as_ref()
            .is_none_or(|held| held.contains(config_key))
    }

    /// Whether events wait for the cycle under way to end (a cycle that could go on for long,
    /// like selfplay_scheduler's pool, yields to them).
    pub(crate) fn events_waiting(&self) -> bool {
        !self.inbox.borrow().is_empty()
    }

    /// The oldest event waiting, for a long cycle that handles events itself (selfplay_scheduler's
    /// pool); the cycle must [`Ctx::ack`] it once handled.
    pub(crate) fn take_event(&self) -> Option<ringrift::events::Event> {
        self.inbox.borrow_mut().pop_front()
    }

    /// Acknowledges events up to `seq` (acks are cumulative) after a cycle handled them.
    pub(crate) fn ack(&self, seq: u64) {
        let _ = self.tx.send(WorkerFrame::Ack(Ack { seq }));
    }

    /// Whether the daemon is stopping, paused or standing by (another node holds its lease): a
    /// cycle that could go on for long starts no new work then.
    pub(crate) fn winding_down(&self) -> bool {
        self.winding_down.get()
    }

    /// Shows `report` (health and counters) from the next heartbeat on, during a cycle that runs
    /// for long; the cycle's own report replaces it when the cycle ends.
    pub(crate) fn publish(&self, report: Report) {
        *self.interim.borrow_mut() = Some(report);
    }

    /// Notes the leases the supervisor told of.
    fn set_leases(&self, leases: &[LeaseInfo]) {
        let per_key = leases.iter().any(|l| l.config_key.is_some());
        *self.leads.borrow_mut() = per_key.then(|| {
            leases
                .iter()
                .filter(|l| l.leader)
                .filter_map(|l| l.config_key.clone())
                .collect()
        });
    }

    /// Publishes an event (validated by the supervisor; a refusal is logged to stderr).
    pub(crate) fn emit(&self, event_type: &str, payload: Value) {
        let _ = self.tx.send(WorkerFrame::Emit(Emit {
            event_type: event_type.to_string(),
            payload,
            source: None,
        }));
    }

    /// Publishes an event and lets the runtime send it before the caller goes on: for events that
    /// must reach the supervisor before whatever blocking work comes next.
    pub(crate) async fn emit_now(&self, event_type: &str, payload: Value) {
        self.emit(event_type, payload);
        tokio::task::yield_now().await;
    }

    /// Runs `command` as a supervisor-owned job and waits for it to end. Its output goes to
    /// logs/jobs/<id>.log; the supervisor stops it after `max_runtime`.
    pub(crate) async fn run_job(
        &self,
        command: Vec<String>,
        max_runtime: Duration,
        env: BTreeMap<String, String>,
    ) -> JobOutcome {
        self.run_job_for(command, max_runtime, env, None).await
    }

    /// Asks the cluster's shared work queue (through the supervisor) and waits for the answer.
    pub(crate) async fn work(&self, op: WorkOp) -> WorkAnswer {
        let (done_tx, done_rx) = oneshot::channel();
        let request_id = {
            let mut jobs = self.jobs.borrow_mut();
            let id = jobs.next_id();
            jobs.work.insert(id, done_tx);
            id
        };
        if self
            .tx
            .send(WorkerFrame::Work(WorkRequest { request_id, op }))
            .is_err()
        {
            self.jobs.borrow_mut().work.remove(&request_id);
        }
        done_rx.await.unwrap_or_else(|_| WorkAnswer::Refused {
            message: "the worker is shutting down".into(),
        })
    }

    /// Hands a work answer to whoever waits for it. False if nobody does.
    fn work_answered(&self, request_id: u64, answer: WorkAnswer) -> bool {
        match self.jobs.borrow_mut().work.remove(&request_id) {
            Some(tx) => tx.send(answer).is_ok(),
            None => false,
        }
    }

    /// As [`Ctx::run_job`], for a job that runs the shared work queue's item `work_item`: the
    /// supervisor keeps the item's claim alive while it runs and stops it if the claim is lost.
    pub(crate) async fn run_job_for(
        &self,
        command: Vec<String>,
        max_runtime: Duration,
        env: BTreeMap<String, String>,
        work_item: Option<i64>,
    ) -> JobOutcome {
        let (done_tx, done_rx) = oneshot::channel();
        let request_id = {
            let mut jobs = self.jobs.borrow_mut();
            let id = jobs.next_id();
            jobs.waiting.insert(id, done_tx);
            id
        };
        let frame = WorkerFrame::SpawnJob(SpawnJob {
            request_id,
            command,
            max_runtime_secs: max_runtime.as_secs_f64(),
            env,
            work_item,
        });
        if self.tx.send(frame).is_err() {
            self.jobs.borrow_mut().waiting.remove(&request_id);
        }
        done_rx.await.unwrap_or_else(|_| JobOutcome {
            job_id: String::new(),
            success: false,
            code: None,
            exit: "the worker is shutting down".into(),
            timed_out: false,
            runtime_secs: 0.0,
        })
    }

    /// Hands a job's end to whoever waits for it. False if nobody does.
    fn job_ended(&self, request_id: u64, outcome: JobOutcome) -> bool {
        match self.jobs.borrow_mut().waiting.remove(&request_id) {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }
}

/// Event ids seen lately, to drop redeliveries (delivery is at-least-once).
#[derive(Default)]
struct SeenIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl SeenIds {
    const CAPACITY: usize = 10_000;

    /// True the first time an id is offered.
    fn first_time(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        if self.order.len() > Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Runs `daemon` on `connection` (the socket the supervisor handed this process at spawn, see
/// `ringrift::protocol::inherited_connection`) until it is told to stop.
///
/// Exit status: 0 after `shutdown` or SIGTERM, 1 if the supervisor refuses the handshake, goes away or
/// start-up fails.
pub(crate) async fn run(
    connection: std::os::unix::net::UnixStream,
    daemon: Box<dyn Daemon>,
    quirks: Quirks,
) -> ExitCode {
    let name = daemon.name().to_owned();
    let mut sigterm = if quirks.ignore_shutdown {
        None
    } else {
        match signal(SignalKind::terminate()) {
            Ok(stream) => Some(stream),
            Err(e) => {
                eprintln!("{name}: failed to install the SIGTERM handler: {e}");
                return ExitCode::FAILURE;
            }
        }
    };

    let handshake = tokio::select! {
        result = handshake(connection, &name) => result,
        () = next_sigterm(&mut sigterm) => {
            eprintln!("{name}: SIGTERM during the handshake; exiting");
            return ExitCode::SUCCESS;
        }
    };
    let (writer, frames, config, leases) = match handshake {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let settings = match Settings::from_config(config.as_ref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{name}: bad configuration from the supervisor: {e:#}");
            return ExitCode::FAILURE;
        }
    };

    let mut session = Session {
        name: name.clone(),
        writer,
        quirks,
        closed: false,
        stopping: false,
        leases,
    };
    match serve(&mut session, daemon, frames, &settings, &mut sigterm).await {
        Ok(()) => {
            println!("{name}: stopped");
            ExitCode::SUCCESS
        }
        Err(Gone(reason)) => {
            eprintln!("{name}: {reason}; exiting");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the next SIGTERM; never, if no handler is installed.
async fn next_sigterm(sigterm: &mut Option<Signal>) {
    match sigterm {
        Some(stream) => {
            if stream.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// What the welcome gives a worker: the write half, the frames that follow, the daemon's
/// configuration, and its lease when it is cluster-scoped.
type Welcomed = (
    OwnedWriteHalf,
    mpsc::Receiver<Incoming>,
    Option<Value>,
    Vec<LeaseInfo>,
);

/// Connects, says hello and waits for the welcome.
async fn handshake(
    connection: std::os::unix::net::UnixStream,
    name: &str,
) -> anyhow::Result<Welcomed> {
    connection
        .set_nonblocking(true)
        .context("failed to set up the connection to the supervisor")?;
    let stream = UnixStream::from_std(connection)
        .context("failed to set up the connection to the supervisor")?;
    let (read, mut write) = stream.into_split();
    let hello = Opening::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Worker,
        daemon: Some(name.to_owned()),
        pid: Some(std::process::id()),
    });
    write
        .write_all(&protocol::encode(&hello))
        .await
        .context("failed to send hello")?;

    // The reader task outlives the handshake: it feeds the main loop through the channel, which makes
    // every frame read cancel-safe inside `select!`.
    let (tx, mut frames) = mpsc::channel(16);
    tokio::spawn(read_frames(read, tx));
    match frames.recv().await {
        Some(Incoming::Frame(FromSupervisor::Welcome {
            protocol,
            config,
            leases,
        })) => {
            if protocol != PROTOCOL_VERSION {
                bail!(
                    "the supervisor speaks protocol {protocol}, this worker speaks {PROTOCOL_VERSION}"
                );
            }
            Ok((write, frames, config, leases))
        }
        Some(Incoming::Frame(FromSupervisor::Error { code, message })) => {
            bail!("the supervisor refused the handshake ({code:?}): {message}")
        }
        Some(Incoming::Frame(other)) => bail!("expected welcome, the supervisor sent {other:?}"),
        Some(Incoming::Bad(e)) => bail!("expected welcome, the supervisor sent a bad frame: {e}"),
        Some(Incoming::Closed(reason)) => bail!("no welcome: {reason}"),
        None => bail!("no welcome: the connection reader stopped"),
    }
}

/// Reads frames (`ringrift::protocol::FrameReader`: at most [`MAX_FRAME_BYTES`] each) until the
/// connection ends.
async fn read_frames(read: OwnedReadHalf, tx: mpsc::Sender<Incoming>) {
    let mut reader = BufReader::new(read);
    let mut frames = protocol::FrameReader::new();
    loop {
        let incoming = match frames.read_async(&mut reader).await {
            Err(e) => Incoming::Closed(format!("failed to read from the supervisor: {e}")),
            Ok(None) => Incoming::Closed("the supervisor closed the connection".into()),
            Ok(Some(Err(protocol::FrameError::TooLarge(..)))) => Incoming::Closed(format!(
                "the supervisor sent a frame longer than {MAX_FRAME_BYTES} bytes"
            )),
            Ok(Some(Err(e))) => Incoming::Bad(e.to_string()),
            Ok(Some(Ok(line))) => match protocol::decode::<FromSupervisor>(line) {
                Ok(frame) => Incoming::Frame(frame),
                Err(e) => Incoming::Bad(e.to_string()),
            },
        };
        let last = matches!(incoming, Incoming::Closed(_));
        if tx.send(incoming).await.is_err() || last {
            return;
        }
    }
}

/// The write side of the connection and the few facts the frames depend on.
struct Session {
    name: String,
    writer: OwnedWriteHalf,
    quirks: Quirks,
    /// A write failed or the supervisor hung up.
    closed: bool,
    /// Shutdown has begun: from here on a lost connection is no longer an error.
    stopping: bool,
    /// A cluster-scoped daemon's leases (one, or one per config key): it acts only while this
    /// node holds one (empty: it is not cluster-scoped, and always acts).
    leases: Vec<LeaseInfo>,
}

impl Session {
    /// Standing by: another node (or none yet) holds every lease of the daemon. The message
    /// names the leaders: `standby (leader: node-b since ...)`.
    fn standby(&self) -> Option<String> {
        if self.leases.is_empty() || self.leases.iter().any(|l| l.leader) {
            return None;
        }
        let leaders: Vec<String> = self.leases.iter().map(LeaseInfo::leader_text).collect();
        Some(format!("standby ({})", leaders.join("; ")))
    }

    /// Notes a change of one lease (by its config key).
    fn lease_changed(&mut self, lease: LeaseInfo) {
        match self
            .leases
            .iter_mut()
            .find(|l| l.config_key == lease.config_key)
        {
            Some(l) => *l = lease,
            None => self.leases.push(lease),
        }
    }
}

impl Session {
    async fn send(&mut self, frame: &WorkerFrame) -> Result<(), Gone> {
        self.send_bytes(&protocol::encode(frame)).await
    }

    async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), Gone> {
        let result = if self.closed {
            Err("the connection to the supervisor is closed".to_owned())
        } else {
            self.writer
                .write_all(bytes)
                .await
                .map_err(|e| format!("failed to write to the supervisor: {e}"))
        };
        match result {
            Ok(()) => Ok(()),
            Err(_) if self.stopping => {
                self.closed = true;
                Ok(())
            }
            Err(reason) => {
                self.closed = true;
                Err(Gone(reason))
            }
        }
    }

    async fn state(&mut self, state: ReportedState, message: Option<&str>) -> Result<(), Gone> {
        self.send(&WorkerFrame::State(StateReport {
            state,
            message: message.map(str::to_owned),
        }))
        .await
    }

    async fn send_malformed(&mut self) -> Result<(), Gone> {
        for bad in malformed_frames() {
            self.send_bytes(&bad).await?;
        }
        Ok(())
    }

    /// Reports SHUTTING_DOWN (best effort) and stops taking new work.
    async fn begin_shutdown(&mut self, why: &str) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        println!("{}: shutting down ({why})", self.name);
        // `stopping` makes a failed send harmless: the supervisor may already be gone.
        let _ = self.state(ReportedState::ShuttingDown, Some(why)).await;
    }
}

/// The frames `--malformed` sends: not JSON, an unknown type, and one byte-for-byte too long.
pub(crate) fn malformed_frames() -> Vec<Vec<u8>> {
    let mut oversized = br#"{"type":"heartbeat","padding":""#.to_vec();
    let total = MAX_FRAME_BYTES + 10;
    let closing = br#""}"#;
    oversized.resize(total - closing.len(), b'x');
    oversized.extend_from_slice(closing);
    oversized.push(b'\n');
    vec![
        b"not json\n".to_vec(),
        b"{\"type\":\"explode\"}\n".to_vec(),
        oversized,
    ]
}

/// Everything after the welcome: start-up, then the loop until shutdown.
async fn serve(
    session: &mut Session,
    daemon: Box<dyn Daemon>,
    mut frames: mpsc::Receiver<Incoming>,
    settings: &Settings,
    sigterm: &mut Option<Signal>,
) -> Result<(), Gone> {
    let name = session.name.clone();
    if session.quirks.malformed_frames {
        eprintln!("{name}: sending malformed frames (--malformed)");
        session.send_malformed().await?;
    }

    session.state(ReportedState::Initializing, None).await?;
    let mut daemon = daemon;
    let (ctx, mut outgoing) = Ctx::new();
    ctx.set_leases(&session.leases);
    let mut report = match daemon.start(ctx.clone(), settings).await {
        Ok(report) => report,
        Err(e) => return Err(Gone(format!("start-up failed: {e:#}"))),
    };
    session.state(ReportedState::Running, None).await?;

    let subscriptions = daemon.subscriptions();
    if !subscriptions.is_empty() {
        session
            .send(&WorkerFrame::Subscribe(Subscribe {
                event_types: subscriptions,
            }))
            .await?;
    }
    let mut seen = SeenIds::default();
    let mut unacked = 0usize;

    let frozen = session.quirks.frozen_progress.then(|| progress(&report, 0));
    let mut cycles: u64 = 0;
    // The daemon is lent to the in-flight cycle and comes back with its report.
    let mut idle: Option<Box<dyn Daemon>> = Some(daemon);
    let mut in_flight: Option<InFlight> = None;
    let mut paused = false;
    let mut run_now = false;
    let mut heartbeats = true;
    let mut link_open = true;

    if let Some(after) = session.quirks.hang_shutting_down_after {
        tokio::time::sleep(after).await;
        eprintln!("{name}: reporting shutting_down, then hanging (--hang-shutting-down-after-ms)");
        session.state(ReportedState::ShuttingDown, None).await?;
        // The SIGTERM handler is installed, so the signal no longer ends the process: only SIGKILL does.
        std::future::pending::<()>().await;
    }
    let mut heartbeat_timer = tokio::time::interval(settings.heartbeat_interval);
    heartbeat_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut cycle_timer = tokio::time::interval(settings.interval);
    cycle_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut stopped = false;
    loop {
        if session.stopping && in_flight.is_none() {
            if stopped {
                return Ok(());
            }
            // The daemon's last step (Daemon::on_stop), in flight like a cycle.
            stopped = true;
            let mut daemon = idle.take().expect("nothing is in flight");
            in_flight = Some(Box::pin(async move {
                let report = daemon.on_stop().await;
                Done {
                    daemon,
                    report,
                    ack: None,
                }
            }));
            continue;
        }
        // A standby daemon takes no new work; a cycle under way when the lease went ends.
        let may_start =
            !paused && !session.stopping && in_flight.is_none() && session.standby().is_none();
        let next_event = may_start
            .then(|| ctx.inbox.borrow_mut().pop_front())
            .flatten();
        if let Some(event) = next_event {
            in_flight = Some(handle_event(&mut idle, event));
            continue;
        }
        if run_now && may_start {
            run_now = false;
            in_flight = Some(launch(&mut idle, cycles + 1));
            continue;
        }

        ctx.winding_down
            .set(paused || session.stopping || session.standby().is_some());
        tokio::select! {
            _ = heartbeat_timer.tick(), if heartbeats => {
                if let Some(r) = ctx.interim.borrow_mut().take() {
                    report = r;
                }
                let health = match session.standby() {
                    Some(message) => ringrift::protocol::Health {
                        healthy: true,
                        status: "standby".into(),
                        message,
                        details: Default::default(),
                    },
                    None => report.health.clone(),
                };
                let heartbeat = WorkerFrame::Heartbeat(Heartbeat {
                    health,
                    progress: frozen.clone().unwrap_or_else(|| progress(&report, cycles)),
                });
                session.send(&heartbeat).await?;
                if session.quirks.hang {
                    eprintln!("{name}: no more heartbeats (--hang)");
                    heartbeats = false;
                }
            }
            _ = cycle_timer.tick(), if may_start => {
                in_flight = Some(launch(&mut idle, cycles + 1));
            }
            done = async { in_flight.as_mut().expect("guarded").await },
                if in_flight.is_some() =>
            {
                in_flight = None;
                idle = Some(done.daemon);
                if let Some(r) = done.report {
                    report = r;
                    ctx.interim.borrow_mut().take();
                }
                match done.ack {
                    // Acks are cumulative: during a burst one ack covers many events.
                    Some(seq) => {
                        unacked += 1;
                        if ctx.inbox.borrow().is_empty() || unacked >= ACK_EVERY {
                            unacked = 0;
                            session.send(&WorkerFrame::Ack(Ack { seq })).await?;
                        }
                    }
                    None => cycles += 1,
                }
            }
            Some(frame) = outgoing.recv() => {
                session.send(&frame).await?;
            }
            incoming = frames.recv(), if link_open => match incoming {
                Some(Incoming::Frame(frame)) => match frame {
                    FromSupervisor::Pause if !session.stopping => {
                        paused = true;
                        run_now = false;
                        println!("{name}: paused");
                        session.state(ReportedState::Paused, None).await?;
                    }
                    FromSupervisor::Resume if !session.stopping => {
                        paused = false;
                        println!("{name}: resumed");
                        session.state(ReportedState::Running, None).await?;
                    }
                    FromSupervisor::RunNow if paused => {
                        eprintln!("{name}: run_now ignored: paused");
                    }
                    FromSupervisor::RunNow if !session.stopping => run_now = true,
                    FromSupervisor::Shutdown if session.quirks.ignore_shutdown => {
                        eprintln!("{name}: ignoring shutdown (--ignore-sigterm)");
                    }
                    FromSupervisor::Shutdown => session.begin_shutdown("shutdown requested").await,
                    FromSupervisor::Error { code, message } => {
                        eprintln!("{name}: the supervisor reported an error ({code:?}): {message}");
                    }
                    FromSupervisor::Event { event } => {
                        if seen.first_time(&event.id) {
                            ctx.inbox.borrow_mut().push_back(event);
                        } else {
                            eprintln!("{name}: duplicate event {} (seq {}) dropped", event.id, event.seq);
                            session.send(&WorkerFrame::Ack(Ack { seq: event.seq })).await?;
                        }
                    }
                    FromSupervisor::JobExit { request_id, job_id, success, code, exit, timed_out, runtime_secs }
                        if ctx.job_ended(request_id, JobOutcome { job_id: job_id.clone(), success, code, exit: exit.clone(), timed_out, runtime_secs }) => {}
                    FromSupervisor::Work { request_id, answer } if ctx.work_answered(request_id, answer.clone()) => {}
                    FromSupervisor::Work { request_id, answer } => {
                        eprintln!("{name}: work answer {request_id} nobody waits for: {answer:?}");
                    }
                    FromSupervisor::JobStarted { request_id, job_id, pid } => {
                        println!("{name}: job {job_id} started (request {request_id}, pid {pid})");
                    }
                    FromSupervisor::JobExit { request_id, job_id, exit, timed_out, runtime_secs, .. } => {
                        println!("{name}: job {job_id} ended (request {request_id}): {exit}; timed out: {timed_out}; ran {runtime_secs:.3}s");
                    }
                    FromSupervisor::Lease(lease) => {
                        let key = lease.config_key.as_deref().map_or(String::new(), |k| format!(" of {k}"));
                        println!(
                            "{name}: {}",
                            if lease.leader {
                                format!("this node holds the lease{key} (fencing token {}): acting", lease.token)
                            } else {
                                lease.standby_message()
                            }
                        );
                        session.lease_changed(lease);
                        ctx.set_leases(&session.leases);
                    }
                    FromSupervisor::Pause | FromSupervisor::Resume | FromSupervisor::RunNow => {}
                    other => eprintln!("{name}: ignoring unexpected frame {other:?}"),
                },
                Some(Incoming::Bad(e)) => {
                    eprintln!("{name}: ignoring bad frame from the supervisor: {e}");
                }
                Some(Incoming::Closed(_)) | None if session.stopping => {
                    link_open = false;
                    session.closed = true;
                }
                Some(Incoming::Closed(reason)) => return Err(Gone(reason)),
                None => return Err(Gone("the connection reader stopped".into())),
            },
            () = next_sigterm(sigterm), if !session.stopping => {
                session.begin_shutdown("SIGTERM").await;
            }
        }
    }
}

/// Lends the daemon to a new cycle future.
fn launch(idle: &mut Option<Box<dyn Daemon>>, n: u64) -> InFlight {
    let mut daemon = idle.take().expect("no cycle is in flight");
    Box::pin(async move {
        let report = daemon.cycle(n).await;
        Done {
            daemon,
            report: Some(report),
            ack: None,
        }
    })
}

/// Lends the daemon to handle one event; the event is acked when it is done.
fn handle_event(idle: &mut Option<Box<dyn Daemon>>, event: ringrift::events::Event) -> InFlight {
    let mut daemon = idle.take().expect("nothing is in flight");
    Box::pin(async move {
        let seq = event.seq;
        let report = daemon.on_event(event).await;
        Done {
            daemon,
            report,
            ack: Some(seq),
        }
    })
}

/// The heartbeat's counters: the daemon's own plus `cycles`, the count of finished cycles.
fn progress(report: &Report, cycles: u64) -> BTreeMap<String, u64> {
    let mut progress = report.counters.clone();
    progress.insert("cycles".into(), cycles);
    progress
}

#[cfg(test)]
mod tests {
    use ringrift::protocol::Health;
    use serde_json::json;
    use tokio::io::BufReader;

    use super::*;

    #[test]
    fn settings_default_to_sixty_and_five_seconds() {
        let settings = Settings::from_config(None).unwrap();
        assert_eq!(settings.interval, Duration::from_secs(60));
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(5));
        let settings = Settings::from_config(Some(&json!({"enabled": true}))).unwrap();
        assert_eq!(settings.interval_secs, 60.0);
    }

    #[test]
    fn settings_read_fractional_and_integer_seconds() {
        let settings =
            Settings::from_config(Some(&json!({"interval": 5, "heartbeat_interval": 0.25})))
                .unwrap();
        assert_eq!(settings.interval, Duration::from_secs(5));
        assert_eq!(settings.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(format!("{}s", settings.interval_secs), "5s");
    }

    #[test]
    fn settings_refuse_zero_negative_and_non_numbers() {
        for bad in [
            json!({"interval": 0}),
            json!({"interval": -1}),
            json!({"heartbeat_interval": "5"}),
        ] {
            assert!(Settings::from_config(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_frames_are_refused_by_the_decoder() {
        let frames = malformed_frames();
        assert_eq!(frames[2].len(), MAX_FRAME_BYTES + 10 + 1);
        for frame in &frames {
            assert_eq!(frame.last(), Some(&b'\n'));
            assert!(protocol::decode::<WorkerFrame>(&frame[..frame.len() - 1]).is_err());
        }
    }

    struct Slow;

    impl Daemon for Slow {
        fn name(&self) -> &str {
            "slow"
        }

        fn start<'a>(&'a mut self, _: Ctx, _: &'a Settings) -> crate::daemons::Start<'a> {
            Box::pin(async { Ok(report()) })
        }

        fn cycle(&mut self, _: u64) -> LocalBoxFuture<'_, Report> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                report()
            })
        }
    }

    fn report() -> Report {
        Report {
            health: Health {
                healthy: true,
                status: "ok".into(),
                ..Health::default()
            },
            counters: BTreeMap::new(),
        }
    }

    /// The worker's side of the wire, read the way the supervisor reads it.
    struct Wire {
        reader: BufReader<OwnedReadHalf>,
        frames: protocol::FrameReader,
    }

    async fn next_frame<T: serde::de::DeserializeOwned>(wire: &mut Wire) -> T {
        let frame = tokio::time::timeout(
            Duration::from_secs(5),
            wire.frames.read_async(&mut wire.reader),
        )
        .await
        .expect("worker answered in time")
        .unwrap()
        .expect("worker kept the connection open");
        protocol::decode(frame.unwrap()).unwrap()
    }

    /// Plays the supervisor against the real runtime over a real socket.
    #[test]
    fn handshake_heartbeats_during_a_slow_cycle_pause_and_shutdown() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let worker = tokio::task::spawn_local(async move {
                run(theirs, Box::new(Slow), Quirks::default()).await
            });
            ours.set_nonblocking(true).unwrap();
            let stream = UnixStream::from_std(ours).unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = Wire {
                reader: BufReader::new(read),
                frames: protocol::FrameReader::new(),
            };

            let Opening::Hello(Hello {
                role, daemon, pid, ..
            }) = next_frame(&mut lines).await;
            assert_eq!(
                (role, daemon.as_deref(), pid),
                (Role::Worker, Some("slow"), Some(std::process::id()))
            );
            let welcome = FromSupervisor::Welcome {
                protocol: PROTOCOL_VERSION,
                config: Some(json!({"interval": 0.1, "heartbeat_interval": 0.05})),
                leases: Vec::new(),
            };
            write.write_all(&protocol::encode(&welcome)).await.unwrap();
            assert!(matches!(
                next_frame(&mut lines).await,
                WorkerFrame::State(StateReport {
                    state: ReportedState::Initializing,
                    ..
                })
            ));
            assert!(matches!(
                next_frame(&mut lines).await,
                WorkerFrame::State(StateReport {
                    state: ReportedState::Running,
                    ..
                })
            ));

            // The first cycle takes 300 ms; heartbeats keep coming every 50 ms meanwhile.
            for _ in 0..4 {
                let WorkerFrame::Heartbeat(Heartbeat { progress, .. }) =
                    next_frame(&mut lines).await
                else {
                    panic!("expected heartbeats during the slow cycle");
                };
                assert_eq!(progress["cycles"], 0);
            }

            write
                .write_all(&protocol::encode(&FromSupervisor::Pause))
                .await
                .unwrap();
            loop {
                match next_frame(&mut lines).await {
                    WorkerFrame::State(StateReport { state, .. }) => {
                        assert_eq!(state, ReportedState::Paused);
                        break;
                    }
                    WorkerFrame::Heartbeat(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }

            write
                .write_all(&protocol::encode(&FromSupervisor::Shutdown))
                .await
                .unwrap();
            loop {
                match next_frame(&mut lines).await {
                    WorkerFrame::State(StateReport { state, .. }) => {
                        assert_eq!(state, ReportedState::ShuttingDown);
                        break;
                    }
                    WorkerFrame::Heartbeat(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            let code = tokio::time::timeout(Duration::from_secs(5), worker)
                .await
                .expect("worker stopped in time")
                .unwrap();
            assert_eq!(code, ExitCode::SUCCESS);
        });
    }
}
