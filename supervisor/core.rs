//! The supervisor's state and its single event loop.
//!
//! One task owns every daemon record. Everything else (IPC connections, child watchers, timers,
//! signals) talks to it through one channel of [`Msg`], so no state is shared and no lock is held
//! across an await. The lifecycle rules themselves are the pure functions of `ringrift::lifecycle`,
//! `ringrift::restart` and `ringrift::deps`; this file applies them to real processes.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringrift::config::{Config, DaemonConfig};
use ringrift::deps;
use ringrift::events::Origin;
use ringrift::lifecycle::{self, DaemonState};
use ringrift::protocol::{
    self, DaemonStatus, FromSupervisor, Health, OpResult, StatusReport, SupervisorInfo,
    ToSupervisor,
};
use ringrift::readiness::Ready;
use ringrift::reload::ReloadAction;
use ringrift::restart::{self, ExitDecision, ExitKind, Jitter, RestartHistory};
use ringrift::watchdog::{LagDetector, Verdict};
use tokio::sync::{mpsc, oneshot};

use crate::containment::{Containment, Member, Unit};
use crate::logwriter::{self, RotatingFile, SharedLog, SupervisorLog};
use crate::paths::Paths;
use crate::unix::{self, OwnedPids, SpawnSpec};

mod jobs;
use jobs::{Job, JobTimer};

pub(crate) type Reply = oneshot::Sender<FromSupervisor>;
pub(crate) use crate::ipc::ConnTx;

/// Who sent a request, as the supervisor knows it (the frame cannot say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requester {
    /// A client on the control socket: the supervisor's user.
    Cli,
    /// The HTTP server, for a request that carried the bearer token.
    Http,
    /// The supervisor itself (`start --foreground`'s initial start).
    Supervisor,
}

/// Everything the core loop reacts to.
pub(crate) enum Msg {
    /// A worker said hello; the reply is its welcome (config) or an error.
    WorkerHello {
        daemon: String,
        /// The spawn whose socket pair the hello came on.
        generation: u64,
        conn_id: u64,
        tx: ConnTx,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    WorkerFrame {
        daemon: String,
        conn_id: u64,
        frame: ToSupervisor,
    },
    WorkerGone {
        daemon: String,
        conn_id: u64,
    },
    JobExited {
        job_id: String,
        status: std::io::Result<std::process::ExitStatus>,
    },
    JobTimer {
        job_id: String,
        kind: JobTimer,
    },
    /// A CLI request (start, stop, status, ...).
    Request {
        frame: ToSupervisor,
        reply: Reply,
        /// The connection's outgoing stream, for answers of more than one frame (events).
        stream: Option<ConnTx>,
        from: Requester,
    },
    /// Time to write the subscribers' positions.
    FlushEvents,
    /// run/ was deleted and has been made again: rewrite what the supervisor keeps there.
    RunDirRecreated,
    ChildExited {
        daemon: String,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
    },
    Timer {
        daemon: String,
        generation: u64,
        kind: TimerKind,
    },
    /// The orphan reaper collected something: groups being drained may now be empty.
    Reaped,
    /// Spawn `generation` of a plain program met its `ready:` condition (probe or log line).
    Ready {
        daemon: String,
        generation: u64,
    },
    /// A CLI request's own deadline has come: answer it with what is known.
    WaiterDeadline {
        id: u64,
    },
    Signal(SignalKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    Backoff,
    Grace,
    ReadyTimeout,
    /// A plain program's `ready: {after: ...}` (or the default wait) is over.
    ReadyAfter,
    Watchdog,
    /// A drained group still had members: look again.
    DrainCheck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignalKind {
    Terminate,
    Interrupt,
    Hangup,
}

/// What the supervisor means to do with a daemon whose process is going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    None,
    Stop,
    Restart,
}

struct Daemon {
    cfg: DaemonConfig,
    state: DaemonState,
    pid: Option<u32>,
    /// Bumped at every spawn: timers and exits of an older process are ignored.
    generation: u64,
    spawned_at: Option<Instant>,
    running_since: Option<Instant>,
    restarts: u32,
    history: RestartHistory,
    health: Health,
    progress: BTreeMap<String, u64>,
    last_heartbeat: Option<Instant>,
    last_progress_change: Instant,
    conn: Option<(u64, ConnTx)>,
    last_exit: Option<String>,
    reason: Option<String>,
    intent: Intent,
    /// Set when the supervisor itself killed the process (watchdog, stalled, ready timeout).
    kill_cause: Option<String>,
    /// The leader has exited; waiting for the rest of its process group (this pgid) to go.
    draining: Option<(u32, ExitInfo)>,
    /// Every process of the current (or draining) spawn: its cgroup or its group + environment.
    unit: Option<Unit>,
    /// A stop was requested but dependents must go first.
    stop_queued: bool,
    /// Bumped each time a start or restart overrides a stop still under way: a stop request
    /// waiting for this daemon then answers "stop overridden".
    stop_overrides: u64,
    /// Bumped each time an attempt to run the daemon failed (it went to BACKOFF).
    failures: u64,
    /// The last attempt failed at spawn (the program could not be started at all).
    spawn_failed: bool,
    /// When the next attempt is due, while in BACKOFF.
    next_attempt: Option<Instant>,
    /// A forced stop's signal (`stop --force`: SIGKILL; `kill --signal`): no shutdown frame, no SIGTERM.
    stop_signal: Option<Signal>,
    /// This spawn's stop has been signalled (SIGTERM or the forced signal).
    terminated: bool,
    /// How the last stop ended when the supervisor had to force it, for the stop's answer.
    stop_how: Option<String>,
    /// The readiness probe of this spawn, aborted when the process ends.
    probe: Option<tokio::task::AbortHandle>,
    /// The state last published as a DAEMON_* event, and the process generation it was about.
    announced: DaemonState,
    announced_generation: u64,
    log: Option<SharedLog>,
}

#[derive(Debug, Clone)]
struct ExitInfo {
    kind: ExitKind,
    desc: String,
}

/// A CLI request waiting for daemons to reach a state.
struct Waiter {
    id: u64,
    targets: Vec<String>,
    /// Per target, its (stop_overrides, failures) when the request came: what happened since is news.
    marks: Vec<(u64, u64)>,
    /// The request answers by then whatever the daemons' states (grace or ready timeouts plus a margin).
    deadline: Instant,
    goal: Goal,
    reply: Reply,
    /// Results already known (names refused up front, ...).
    early: Vec<OpResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Up,
    Down,
    Paused,
    Resumed,
}

/// What the supervisor hands the core loop when it starts.
pub(crate) struct CoreParts {
    pub paths: Paths,
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub tx: mpsc::UnboundedSender<Msg>,
    pub log: Arc<SupervisorLog>,
    pub owned: OwnedPids,
    pub worker_bin: PathBuf,
    pub events: crate::events::Router,
    pub containment: Containment,
}

pub(crate) struct Core {
    paths: Paths,
    config: Config,
    config_path: Option<PathBuf>,
    daemons: BTreeMap<String, Daemon>,
    waiters: Vec<Waiter>,
    waiter_seq: u64,
    tx: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    owned: OwnedPids,
    worker_bin: PathBuf,
    started: Instant,
    jitter: Jitter,
    shutting_down: Option<Vec<Reply>>,
    interrupts: u32,
    jobs: BTreeMap<String, Job>,
    job_seq: u64,
    /// run/processes needs rewriting (a process was spawned or has ended).
    records_dirty: bool,
    /// Shutdown has asked the remaining jobs to stop.
    stopping_jobs: bool,
    /// Kernel start times of the process groups recorded in run/processes.
    start_times: std::collections::HashMap<u32, u64>,
    events: crate::events::Router,
    containment: Containment,
    /// Where the HTTP server listens (None: disabled or it could not bind).
    pub(crate) http_addr: Option<String>,
    /// Why HTTP is off although enabled (see `SupervisorInfo::http_error`).
    pub(crate) http_error: Option<String>,
    /// The control socket this supervisor bound (shared with the task that keeps run/ in place):
    /// cleared when the supervisor removes it on purpose, at shutdown.
    pub(crate) socket_id: crate::server::SocketId,
    last_flush: Instant,
    flush_pending: bool,
    pub(crate) exit_now: bool,
    /// Notices when the supervisor itself did not run (stopped, frozen, starved); shared with its ticker.
    lag: Arc<Mutex<LagDetector>>,
}

/// How often, at most, subscribers' acked positions are written to disk.
const EVENT_FLUSH_EVERY: Duration = Duration::from_millis(250);

impl Core {
    pub(crate) fn new(parts: CoreParts) -> Core {
        let CoreParts {
            paths,
            config,
            config_path,
            tx,
            log,
            owned,
            worker_bin,
            events,
            containment,
        } = parts;
        let daemons = config
            .daemons
            .values()
            .map(|c| (c.name.clone(), Daemon::new(c.clone())))
            .collect();
        let seed = std::process::id() as u64 ^ unix_nanos();
        Core {
            paths,
            config,
            config_path,
            daemons,
            waiters: Vec::new(),
            waiter_seq: 0,
            tx,
            log,
            owned,
            worker_bin,
            started: Instant::now(),
            jitter: Jitter::new(seed),
            shutting_down: None,
            interrupts: 0,
            jobs: BTreeMap::new(),
            job_seq: 0,
            records_dirty: false,
            stopping_jobs: false,
            start_times: std::collections::HashMap::new(),
            events,
            containment,
            http_addr: None,
            http_error: None,
            socket_id: Default::default(),
            last_flush: Instant::now(),
            flush_pending: false,
            exit_now: false,
            lag: Arc::new(Mutex::new(LagDetector::new(Instant::now()))),
        }
    }

    /// Runs until shutdown completes.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        // The ticker shows the supervisor ran; a late tick marks a resumption for the watchdog.
        // Counted from now: whatever happened before the loop runs is not a pause.
        *self.lag.lock().expect("lag lock") = LagDetector::new(Instant::now());
        let lag = self.lag.clone();
        let log = self.log.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(ringrift::watchdog::TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let gap = lag.lock().expect("lag lock").tick(Instant::now());
                if let Some(gap) = gap {
                    log.warn(&format!(
                        "the supervisor did not run for {:.1}s (stopped or starved): watchdog windows start again",
                        gap.as_secs_f64()
                    ));
                }
            }
        });
        while let Some(msg) = rx.recv().await {
            self.handle(msg);
            self.settle();
            self.forget_removed();
            if self.exit_now {
                break;
            }
        }
        ticker.abort();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::WorkerHello {
                daemon,
                generation,
                conn_id,
                tx,
                reply,
            } => {
                let _ = reply.send(self.worker_hello(&daemon, generation, conn_id, tx));
            }
            Msg::WorkerFrame {
                daemon,
                conn_id,
                frame,
            } => self.worker_frame(&daemon, conn_id, frame),
            Msg::WorkerGone { daemon, conn_id } => {
                if let Some(d) = self.daemons.get_mut(&daemon)
                    && d.conn.as_ref().is_some_and(|(id, _)| *id == conn_id)
                {
                    d.conn = None;
                    self.events.disconnect(&daemon);
                }
            }
            Msg::Request {
                frame,
                reply,
                stream,
                from,
            } => self.request(frame, reply, stream, from),
            Msg::RunDirRecreated => self.records_dirty = true,
            Msg::FlushEvents => {
                self.flush_pending = false;
                self.flush_events();
            }
            Msg::ChildExited {
                daemon,
                generation,
                status,
            } => self.child_exited(&daemon, generation, status),
            Msg::Timer {
                daemon,
                generation,
                kind,
            } => self.timer(&daemon, generation, kind),
            Msg::Reaped => {
                let draining: Vec<String> = self
                    .daemons
                    .iter()
                    .filter(|(_, d)| d.draining.is_some())
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in draining {
                    self.check_drained(&name);
                }
            }
            Msg::Signal(kind) => self.signal(kind),
            Msg::Ready { daemon, generation } => self.became_ready(&daemon, generation),
            Msg::WaiterDeadline { id } => self.waiter_deadline(id),
            Msg::JobExited { job_id, status } => self.on_job_exited(&job_id, status),
            Msg::JobTimer { job_id, kind } => self.on_job_timer(&job_id, kind),
        }
    }

    // ------------------------------------------------------------------ requests from the CLI

    fn request(
        &mut self,
        frame: ToSupervisor,
        reply: Reply,
        stream: Option<ConnTx>,
        from: Requester,
    ) {
        if self.shutting_down.is_some()
            && !matches!(frame, ToSupervisor::Status { .. } | ToSupervisor::Shutdown)
        {
            let _ = reply.send(error(
                protocol::ErrorCode::ShuttingDown,
                "the supervisor is shutting down",
            ));
            return;
        }
        match frame {
            ToSupervisor::Status { name } => {
                let report = self.status_report();
                let report = match name {
                    None => report,
                    Some(n) => match self.resolve_name(&n) {
                        Ok(n) => StatusReport {
                            daemons: report.daemons.into_iter().filter(|d| d.name == n).collect(),
                            ..report
                        },
                        Err(e) => {
                            let _ = reply.send(error(protocol::ErrorCode::UnknownDaemon, &e));
                            return;
                        }
                    },
                };
                let _ = reply.send(FromSupervisor::Status(report));
            }
            ToSupervisor::Start {
                names,
                all,
                profile,
                no_wait,
            } => self.start_request(names, all, profile, no_wait, reply),
            ToSupervisor::Stop { names, all, force } => {
                self.stop_request(names, all, force.then_some(Signal::SIGKILL), reply)
            }
            ToSupervisor::Kill { names, signal } => {
                let sig = match signal.as_deref().map(parse_signal).transpose() {
                    Ok(sig) => sig.unwrap_or(Signal::SIGKILL),
                    Err(e) => {
                        let _ = reply.send(error(protocol::ErrorCode::BadRequest, &e));
                        return;
                    }
                };
                self.stop_request(names, false, Some(sig), reply)
            }
            ToSupervisor::Restart { names } => self.restart_request(names, reply),
            ToSupervisor::Pause { names } => self.pause_request(names, true, reply),
            ToSupervisor::Resume { names } => self.pause_request(names, false, reply),
            ToSupervisor::Reload => self.reload(Some(reply)),
            ToSupervisor::Emit {
                event_type,
                payload,
                ..
            } => {
                let origin = match from {
                    Requester::Cli => Origin::Cli,
                    Requester::Http => Origin::Http,
                    Requester::Supervisor => Origin::Supervisor,
                };
                let answer = match self.publish_from(origin, &event_type, payload) {
                    Ok(ev) => FromSupervisor::Emitted {
                        seq: ev.seq,
                        id: ev.id.clone(),
                        event_type: ev.event_type.clone(),
                    },
                    Err((code, e)) => error(code, &e),
                };
                let _ = reply.send(answer);
            }
            ToSupervisor::Events {
                since,
                types,
                follow,
                limit,
            } => {
                let mut set = BTreeSet::new();
                for t in &types {
                    let n = ringrift::events::normalize(t);
                    if ringrift::events::find(&n).is_none() {
                        let _ = reply.send(error(
                            protocol::ErrorCode::BadRequest,
                            &format!("unknown event type '{t}'"),
                        ));
                        return;
                    }
                    set.insert(n);
                }
                let Some(stream) = stream else {
                    let _ = reply.send(error(
                        protocol::ErrorCode::BadRequest,
                        "events need a streaming connection",
                    ));
                    return;
                };
                // One page: a client that wants more asks again from `next_since`.
                let page = self.events.query(since.unwrap_or(0), &set, limit);
                for ev in page.events {
                    let _ = stream.send(FromSupervisor::Event {
                        event: (*ev).clone(),
                    });
                }
                let end = FromSupervisor::EndOfEvents {
                    last_seq: self.events.info().last_seq,
                    next_since: page.next_since,
                };
                // Following starts once the history is exhausted; until then it is paged like a listing.
                if follow && page.next_since.is_none() {
                    let _ = stream.send(end);
                    self.events.watch(&set, stream);
                    // No final reply: the stream stays open until the client leaves.
                    drop(reply);
                } else {
                    let _ = reply.send(end);
                }
            }
            ToSupervisor::Shutdown => self.begin_shutdown(Some(reply)),
            other => {
                let _ = reply.send(error(
                    protocol::ErrorCode::UnexpectedFrame,
                    &format!("{} is not a CLI request", frame_name(&other)),
                ));
            }
        }
    }

    /// Resolves user-typed names; unknown ones become failed results.
    /// A user-typed name: one of the configuration, or one that a reload removed and that is still
    /// shutting down (listed by `status`, so it can be stopped with `--force` or killed).
    fn resolve_name(&self, name: &str) -> Result<String, String> {
        self.config.resolve(name).or_else(|e| {
            let n = ringrift::catalog::normalize(name);
            if self.daemons.contains_key(&n) {
                Ok(n)
            } else {
                Err(e.to_string())
            }
        })
    }

    fn resolve(&self, names: &[String]) -> (Vec<String>, Vec<OpResult>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for n in names {
            match self.resolve_name(n) {
                Ok(n) => {
                    if !ok.contains(&n) {
                        ok.push(n)
                    }
                }
                Err(e) => bad.push(OpResult {
                    name: n.clone(),
                    ok: false,
                    message: e,
                }),
            }
        }
        (ok, bad)
    }

    fn start_request(
        &mut self,
        names: Vec<String>,
        all: bool,
        profile: Option<String>,
        no_wait: bool,
        reply: Reply,
    ) {
        let (mut selected, bad) = self.resolve(&names);
        if !bad.is_empty() {
            let _ = reply.send(FromSupervisor::Done {
                ok: false,
                results: bad,
            });
            return;
        }
        if all {
            selected.extend(self.config.enabled());
        }
        if let Some(p) = profile {
            match self.config.profiles.get(&p.to_ascii_lowercase()) {
                Some(members) => selected.extend(members.iter().cloned()),
                None => {
                    let hint = ringrift::catalog::suggestion(
                        &p,
                        self.config.profiles.keys().map(String::as_str),
                    );
                    let _ = reply.send(error(
                        protocol::ErrorCode::BadRequest,
                        &format!("unknown profile '{p}': {hint}"),
                    ));
                    return;
                }
            }
        }
        if selected.is_empty() {
            let _ = reply.send(error(
                protocol::ErrorCode::BadRequest,
                "nothing to start: name daemons, or use --all or --profile",
            ));
            return;
        }
        let graph = self.config.graph();
        let requested: BTreeSet<String> = selected.into_iter().collect();
        let set = deps::with_dependencies(&graph, &requested);
        let order = deps::start_order(&graph, &set);
        for name in &order {
            if !requested.contains(name) && self.daemons[name].state.is_at_rest() {
                self.log.info(&format!(
                    "{name}: started as a dependency of {}",
                    dependents_in(&graph, name, &requested)
                ));
            }
            self.want_up(name);
        }
        self.add_waiter(order, Goal::Up, Vec::new(), reply, no_wait);
    }

    /// Marks a daemon as wanted: at rest → WAITING (the pump spawns it once its dependencies are up).
    fn want_up(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("resolved name");
        if d.stop_queued || d.intent == Intent::Stop {
            // A stop still under way: it will not end in STOPPED, and its request hears so.
            d.stop_overrides += 1;
            self.log.info(&format!("{name}: stop overridden by start"));
        }
        d.stop_queued = false;
        d.stop_signal = None;
        if d.intent == Intent::Stop {
            d.intent = Intent::Restart;
        }
        if d.state.is_at_rest() {
            d.history.clear();
            d.reason = None;
            set_state(&self.log, name, d, DaemonState::Waiting);
        }
    }

    /// Stops daemons, dependents first; `force` is the signal of a forced stop (no grace period for
    /// SIGKILL), also given to the dependents that stop with them.
    fn stop_request(&mut self, names: Vec<String>, all: bool, force: Option<Signal>, reply: Reply) {
        let (selected, bad) = self.resolve(&names);
        if !bad.is_empty() {
            let _ = reply.send(FromSupervisor::Done {
                ok: false,
                results: bad,
            });
            return;
        }
        let requested: BTreeSet<String> = if all {
            self.daemons.keys().cloned().collect()
        } else {
            selected.into_iter().collect()
        };
        if requested.is_empty() {
            let _ = reply.send(error(
                protocol::ErrorCode::BadRequest,
                "nothing to stop: name daemons, or use --all",
            ));
            return;
        }
        let graph = self.config.graph();
        let set = deps::with_dependents(&graph, &requested);
        let order = deps::stop_order(&graph, &set);
        let live: Vec<String> = order
            .into_iter()
            .filter(|n| requested.contains(n) || !self.daemons[n].state.is_at_rest())
            .collect();
        for name in &live {
            if !requested.contains(name) {
                self.log.info(&format!(
                    "{name}: stopping because it depends on a daemon being stopped"
                ));
            }
            self.want_down(name);
            if let Some(sig) = force {
                self.force_stop(name, sig);
            }
        }
        self.add_waiter(live, Goal::Down, Vec::new(), reply, false);
    }

    fn want_down(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("resolved name");
        match d.state {
            DaemonState::Waiting | DaemonState::Backoff => {
                d.intent = Intent::None;
                d.stop_queued = false;
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            DaemonState::Stopped | DaemonState::Failed => {}
            _ => {
                d.stop_queued = true;
                if d.intent == Intent::Restart {
                    d.intent = Intent::Stop;
                }
            }
        }
    }

    /// A forced stop of a daemon already going down, or about to: its signal goes out now (or when
    /// its dependents are gone, for a queued stop).
    fn force_stop(&mut self, name: &str, sig: Signal) {
        let d = self.daemons.get_mut(name).expect("resolved name");
        if d.state.is_at_rest() {
            return;
        }
        d.stop_signal = Some(sig);
        if d.state == DaemonState::ShuttingDown {
            self.begin_stop(name);
        }
    }

    fn restart_request(&mut self, names: Vec<String>, reply: Reply) {
        let (selected, bad) = self.resolve(&names);
        if !bad.is_empty() || selected.is_empty() {
            let msg = if bad.is_empty() {
                vec![OpResult {
                    name: String::new(),
                    ok: false,
                    message: "name the daemons to restart".into(),
                }]
            } else {
                bad
            };
            let _ = reply.send(FromSupervisor::Done {
                ok: false,
                results: msg,
            });
            return;
        }
        for name in &selected {
            let d = self.daemons.get_mut(name).expect("resolved");
            d.history.clear();
            d.reason = None;
            if d.stop_queued || d.intent == Intent::Stop {
                d.stop_overrides += 1;
                d.stop_queued = false;
                self.log
                    .info(&format!("{name}: stop overridden by restart"));
            }
            if d.state.has_process() && d.state != DaemonState::ShuttingDown {
                d.intent = Intent::Restart;
                self.begin_stop(name);
            } else if d.state == DaemonState::ShuttingDown {
                d.intent = Intent::Restart;
            } else {
                self.want_up(name);
            }
        }
        // Make sure whatever they depend on is (or comes) up as well.
        let graph = self.config.graph();
        let set = deps::with_dependencies(&graph, &selected.iter().cloned().collect());
        for name in deps::start_order(&graph, &set) {
            if !selected.contains(&name) {
                self.want_up(&name);
            }
        }
        self.add_waiter(selected, Goal::Up, Vec::new(), reply, false);
    }

    fn pause_request(&mut self, names: Vec<String>, pause: bool, reply: Reply) {
        let (selected, mut bad) = self.resolve(&names);
        let mut targets = Vec::new();
        for name in selected {
            let d = self.daemons.get_mut(&name).expect("resolved");
            let want = if pause {
                DaemonState::Running
            } else {
                DaemonState::Paused
            };
            if d.state != want {
                let verb = if pause { "pause" } else { "resume" };
                bad.push(OpResult {
                    name: name.clone(),
                    ok: false,
                    message: format!("cannot {verb}: it is {}", d.state),
                });
                continue;
            }
            if d.cfg.protocol {
                if let Some((_, tx)) = &d.conn {
                    let _ = tx.send(if pause {
                        FromSupervisor::Pause
                    } else {
                        FromSupervisor::Resume
                    });
                    targets.push(name);
                } else {
                    bad.push(OpResult {
                        name: name.clone(),
                        ok: false,
                        message: "not connected to the supervisor".into(),
                    });
                }
            } else if let Some(unit) = &d.unit {
                // The whole tree: cgroup.freeze, or SIGSTOP/SIGCONT to the group and its strays.
                unit.freeze(pause);
                let to = if pause {
                    DaemonState::Paused
                } else {
                    DaemonState::Running
                };
                set_state(&self.log, &name, d, to);
                targets.push(name);
            }
        }
        let goal = if pause { Goal::Paused } else { Goal::Resumed };
        self.add_waiter(targets, goal, bad, reply, false);
    }

    fn add_waiter(
        &mut self,
        targets: Vec<String>,
        goal: Goal,
        early: Vec<OpResult>,
        reply: Reply,
        no_wait: bool,
    ) {
        if no_wait {
            let mut results = early;
            results.extend(targets.iter().map(|n| OpResult {
                name: n.clone(),
                ok: true,
                message: format!("{}", self.daemons[n].state),
            }));
            let ok = results.iter().all(|r| r.ok);
            let _ = reply.send(FromSupervisor::Done { ok, results });
            return;
        }
        let marks = targets
            .iter()
            .map(|n| {
                let d = &self.daemons[n];
                (d.stop_overrides, d.failures)
            })
            .collect();
        let within = self.request_deadline(&targets, goal);
        self.waiter_seq += 1;
        let id = self.waiter_seq;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(within).await;
            let _ = tx.send(Msg::WaiterDeadline { id });
        });
        self.waiters.push(Waiter {
            id,
            targets,
            marks,
            deadline: Instant::now() + within,
            goal,
            reply,
            early,
        });
    }

    /// How long a request may take: per level of the dependency chain among its targets, the
    /// longest grace period (stops) or ready timeout (starts) of its daemons, plus a margin.
    fn request_deadline(&self, targets: &[String], goal: Goal) -> Duration {
        const MARGIN: Duration = Duration::from_secs(5);
        let set: BTreeSet<&String> = targets.iter().collect();
        let graph = self.config.graph();
        let order = deps::start_order(&graph, &targets.iter().cloned().collect());
        let mut level: BTreeMap<&str, u32> = BTreeMap::new();
        for n in &order {
            let l = self.daemons[n]
                .cfg
                .depends_on
                .iter()
                .filter(|d| set.contains(d))
                .filter_map(|d| level.get(d.as_str()))
                .max()
                .map_or(1, |l| l + 1);
            level.insert(n, l);
        }
        let levels = level.values().copied().max().unwrap_or(1);
        let each = targets
            .iter()
            .map(|n| {
                let c = &self.daemons[n].cfg;
                match goal {
                    Goal::Down => c.grace_period,
                    // A start may also wait out a restart or two before it is ready.
                    _ => c.ready_timeout + c.grace_period,
                }
            })
            .max()
            .unwrap_or_default();
        each * levels + MARGIN
    }

    /// A request's deadline: every target not yet settled is answered with its state now.
    fn waiter_deadline(&mut self, id: u64) {
        let Some(i) = self.waiters.iter().position(|w| w.id == id) else {
            return;
        };
        let w = self.waiters.swap_remove(i);
        let mut results = w.early.clone();
        let outcomes = self.outcomes(&w);
        for (name, outcome) in w.targets.iter().zip(outcomes) {
            let (ok, message) = match outcome {
                Some(Ok(m)) => (true, m),
                Some(Err(m)) => (false, m),
                None => {
                    let d = &self.daemons[name];
                    let why = d
                        .reason
                        .clone()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default();
                    (
                        false,
                        format!("still {} at the request's deadline{why}", d.state),
                    )
                }
            };
            results.push(OpResult {
                name: name.clone(),
                ok,
                message,
            });
        }
        let ok = results.iter().all(|r| r.ok);
        let _ = w.reply.send(FromSupervisor::Done { ok, results });
    }

    /// Answers every waiter whose daemons have all reached a final state for its goal.
    fn resolve_waiters(&mut self) {
        // A client that gave up (timed out, Ctrl-C) no longer needs an answer.
        self.waiters.retain(|w| !w.reply.is_closed());
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            let outcomes = self.outcomes(w);
            if outcomes.iter().all(Option::is_some) {
                let w = self.waiters.swap_remove(i);
                let mut results = w.early.clone();
                for (name, outcome) in w.targets.iter().zip(outcomes) {
                    let (ok, message) = match outcome.expect("all settled") {
                        Ok(m) => (true, m),
                        Err(m) => (false, m),
                    };
                    results.push(OpResult {
                        name: name.clone(),
                        ok,
                        message,
                    });
                }
                let ok = results.iter().all(|r| r.ok);
                let _ = w.reply.send(FromSupervisor::Done { ok, results });
            } else {
                i += 1;
            }
        }
    }

    /// What became of each of a waiter's targets so far: None while it is still on its way.
    fn outcomes(&self, w: &Waiter) -> Vec<Option<Result<String, String>>> {
        let mut out: Vec<Option<Result<String, String>>> = Vec::with_capacity(w.targets.len());
        for (k, name) in w.targets.iter().enumerate() {
            let d = &self.daemons[name];
            let (overrides, failures) = w.marks[k];
            let reason = || {
                d.reason
                    .clone()
                    .or_else(|| d.last_exit.clone())
                    .unwrap_or_else(|| "stopped".into())
            };
            let outcome = match (w.goal, d.state) {
                (Goal::Down, _) if d.stop_overrides != overrides => Some(Err(format!(
                    "stop overridden by a later start or restart (now {})",
                    d.state
                ))),
                (Goal::Down, s) if s.is_at_rest() => Some(Ok(match &d.stop_how {
                    Some(how) => format!("{s} ({how})"),
                    None => format!("{s}"),
                })),
                (Goal::Up, DaemonState::Running | DaemonState::Paused) => {
                    Some(Ok(format!("{} (pid {})", d.state, d.pid.unwrap_or(0))))
                }
                (Goal::Up, DaemonState::Failed | DaemonState::Stopped) => {
                    Some(Err(format!("{}: {}", d.state, reason())))
                }
                // An attempt made for this request failed, and the next one will not come soon
                // enough to answer by the deadline (or the program cannot be started at all).
                (Goal::Up, DaemonState::Backoff)
                    if d.failures > failures
                        && (d.spawn_failed || d.next_attempt.is_none_or(|t| t >= w.deadline)) =>
                {
                    let next = d
                        .next_attempt
                        .map(|t| {
                            format!(
                                "; next attempt in {:.1}s",
                                t.saturating_duration_since(Instant::now()).as_secs_f64()
                            )
                        })
                        .unwrap_or_default();
                    Some(Err(format!("BACKOFF: {}{next}", reason())))
                }
                // Waiting for a dependency that has already failed this request.
                (Goal::Up, DaemonState::Waiting) => d.cfg.depends_on.iter().find_map(|dep| {
                    let j = w.targets.iter().position(|t| t == dep)?;
                    match out.get(j)? {
                        Some(Err(m)) => {
                            Some(Err(format!("WAITING: dependency {dep} is not ready ({m})")))
                        }
                        _ => None,
                    }
                }),
                (Goal::Paused, DaemonState::Paused) => Some(Ok("PAUSED".into())),
                (Goal::Paused, s) if s != DaemonState::Running => Some(Err(format!("{s}"))),
                (Goal::Resumed, DaemonState::Running) => Some(Ok("RUNNING".into())),
                (Goal::Resumed, s) if s != DaemonState::Paused => Some(Err(format!("{s}"))),
                _ => None,
            };
            out.push(outcome);
        }
        out
    }

    // ------------------------------------------------------------------ the pump

    /// Moves everything forward that can move: queued stops whose dependents are gone, waiting
    /// starts whose dependencies are up, and answers waiters.
    /// Drops the records of daemons a reload removed from the configuration once they are at
    /// rest, so `status` never lists a daemon that `status NAME` calls unknown.
    fn forget_removed(&mut self) {
        let config = &self.config;
        let log = &self.log;
        self.daemons.retain(|name, d| {
            let keep = config.daemons.contains_key(name) || !d.state.is_at_rest();
            if !keep {
                log.info(&format!(
                    "{name}: removed from the configuration, forgotten"
                ));
            }
            keep
        });
    }

    fn settle(&mut self) {
        let graph = self.config.graph();
        // Stops: dependents first.
        let queued: Vec<String> = self
            .daemons
            .iter()
            .filter(|(_, d)| d.stop_queued)
            .map(|(n, _)| n.clone())
            .collect();
        for name in queued {
            let blocked = deps::dependents_of(&graph, &name).iter().any(|dep| {
                let d = &self.daemons[*dep];
                d.stop_queued || d.state.has_process()
            });
            if !blocked {
                let d = self.daemons.get_mut(&name).expect("known");
                d.stop_queued = false;
                if d.intent != Intent::Restart {
                    d.intent = Intent::Stop;
                }
                self.begin_stop(&name);
            }
        }
        // Starts: dependencies first.
        if self.shutting_down.is_none() {
            let waiting: Vec<String> = deps::start_order(
                &graph,
                &self
                    .daemons
                    .iter()
                    .filter(|(_, d)| d.state == DaemonState::Waiting)
                    .map(|(n, _)| n.clone())
                    .collect(),
            );
            for name in waiting {
                let unmet: Vec<String> = deps::unmet(&graph, &name, |n| {
                    self.daemons[n].state.satisfies_dependents()
                })
                .iter()
                .map(|s| s.to_string())
                .collect();
                if unmet.is_empty() {
                    self.spawn(&name);
                    continue;
                }
                let waiting_for = format!(
                    "waiting for {} to be ready",
                    unmet
                        .iter()
                        .map(|n| format!("{n} ({})", self.daemons[n.as_str()].state))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.daemons.get_mut(&name).expect("known").reason = Some(waiting_for);
                // A dependency that will not come up by itself leaves this one unable to start.
                if let Some(dead) = unmet
                    .iter()
                    .find(|n| self.daemons[n.as_str()].state.is_at_rest())
                {
                    let why = format!(
                        "not started: dependency {dead} is {}",
                        self.daemons[dead.as_str()].state
                    );
                    let d = self.daemons.get_mut(&name).expect("known");
                    d.reason = Some(why.clone());
                    self.log.warn(&format!("{name}: {why}"));
                    set_state(&self.log, &name, d, DaemonState::Stopped);
                }
            }
        }
        self.resolve_waiters();
        if self.shutting_down.is_some()
            && self
                .daemons
                .values()
                .all(|d| d.state.is_at_rest() && d.pid.is_none())
        {
            if self.jobs.is_empty() {
                self.finish_shutdown();
            } else if !self.stopping_jobs {
                self.stopping_jobs = true;
                let running: Vec<String> = self.jobs.keys().cloned().collect();
                for id in running {
                    self.stop_job(&id);
                }
            }
        }
        self.announce();
        self.flush_events();
        if self.records_dirty {
            self.records_dirty = false;
            let mut live: Vec<(u32, String)> = self
                .daemons
                .values()
                .filter_map(|d| Self::group_of(d).map(|p| (p, d.cfg.name.clone())))
                .collect();
            live.extend(self.jobs.values().map(|j| (j.pid, format!("job {}", j.id))));
            // Each group's start time is read once, when it is first recorded.
            self.start_times
                .retain(|pgid, _| live.iter().any(|(p, _)| p == pgid));
            let live: Vec<(u32, u64, String)> = live
                .into_iter()
                .map(|(pgid, what)| {
                    let start = *self.start_times.entry(pgid).or_insert_with(|| {
                        unix::proc_stat(pgid).map(|s| s.start_time).unwrap_or(0)
                    });
                    (pgid, start, what)
                })
                .collect();
            if let Err(e) = crate::leftovers::record(&self.paths, &live) {
                self.log.warn(&format!(
                    "cannot record live processes in {}: {e}",
                    self.paths.run_dir.display()
                ));
            }
        }
    }

    // ------------------------------------------------------------------ processes

    fn spawn(&mut self, name: &str) {
        let tx = self.tx.clone();
        let owned = self.owned.clone();
        let log_cfg = (self.config.logs.max_bytes, self.config.logs.max_files);
        let daemon_log_path = self.paths.daemon_log(name);
        let worker_bin = self.worker_bin.clone();
        let root = self.paths.root.clone();
        let socket = self.paths.socket.display().to_string();
        let d = self.daemons.get_mut(name).expect("known");
        if d.log.is_none() {
            match RotatingFile::open(&daemon_log_path, log_cfg.0, log_cfg.1) {
                Ok(f) => d.log = Some(Arc::new(Mutex::new(f))),
                Err(e) => self.log.error(&format!(
                    "{name}: cannot open {}: {e}",
                    daemon_log_path.display()
                )),
            }
        }
        let (program, args): (PathBuf, Vec<String>) = match &d.cfg.command {
            Some(cmd) => (PathBuf::from(&cmd[0]), cmd[1..].to_vec()),
            None => (worker_bin, vec![name.to_string()]),
        };
        let mut env = tree_env(&root, &socket);
        env.push((protocol::DAEMON_ENV.to_string(), name.to_string()));
        env.extend(d.cfg.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // A daemon that speaks the protocol gets its own connection: one end of a socket pair,
        // inherited at spawn. Holding it is its identity (DESIGN.md, trust model).
        let pair = if d.cfg.protocol {
            match std::os::unix::net::UnixStream::pair() {
                Ok((ours, theirs)) => {
                    env.push((protocol::FD_ENV.to_string(), theirs.as_raw_fd().to_string()));
                    Some((ours, theirs))
                }
                Err(e) => {
                    self.log
                        .error(&format!("{name}: cannot make its connection: {e}"));
                    None
                }
            }
        } else {
            None
        };
        d.generation += 1;
        let generation = d.generation;
        if d.state == DaemonState::Waiting {
            d.reason = None;
        }
        d.kill_cause = None;
        d.terminated = false;
        d.stop_how = None;
        d.stop_signal = None;
        d.next_attempt = None;
        if let Some(p) = d.probe.take() {
            p.abort();
        }
        d.draining = None;
        d.health = Health::default();
        d.progress.clear();
        d.last_heartbeat = None;
        d.conn = None;
        let prepared = self
            .containment
            .prepare(&Member::Daemon(name.to_string()), &d.cfg.limits);
        let spec = SpawnSpec {
            program: &program,
            args: &args,
            cwd: &root,
            env,
            pass_fd: pair.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
            cgroup_procs: prepared.procs.as_ref().map(|f| f.as_raw_fd()),
        };
        let spawned = unix::spawn(&spec);
        // Our copy of the child's end must go, or the worker would never see us hang up.
        let ours = pair.map(|(ours, _theirs)| ours);
        match spawned {
            Ok(mut child) => {
                if let Some(ours) = ours
                    && let Err(e) = crate::ipc::adopt_worker(
                        ours,
                        name.to_string(),
                        generation,
                        self.tx.clone(),
                        self.log.clone(),
                    )
                {
                    self.log
                        .error(&format!("{name}: cannot serve its connection: {e}"));
                }
                let pid = child.id().expect("a just-spawned child has a pid");
                owned.insert(pid);
                self.records_dirty = true;
                let unit = self
                    .containment
                    .unit(Member::Daemon(name.to_string()), pid, prepared);
                if let Some(why) = &unit.why_not {
                    self.log
                        .warn(&format!("{name}: not contained by a cgroup: {why}"));
                }
                for p in &unit.limit_problems {
                    self.log.warn(&format!("{name}: {p}"));
                }
                d.unit = Some(unit);
                d.pid = Some(pid);
                d.spawned_at = Some(Instant::now());
                d.running_since = None;
                d.last_progress_change = Instant::now();
                d.spawn_failed = false;
                // A `ready: {log: ...}` condition watches the output on its way to the log.
                let watch = match &d.cfg.ready {
                    Some(Ready::Log(pattern)) => {
                        let tx = self.tx.clone();
                        let daemon = name.to_string();
                        Some(crate::readiness::LineWatch::new(
                            pattern.clone(),
                            Box::new(move || {
                                let _ = tx.send(Msg::Ready { daemon, generation });
                            }),
                        ))
                    }
                    _ => None,
                };
                if let Some(log) = &d.log {
                    if let Some(out) = child.stdout.take() {
                        spawn_pump(out, logwriter::Stream::Out, log, watch.as_ref());
                    }
                    if let Some(err) = child.stderr.take() {
                        spawn_pump(err, logwriter::Stream::Err, log, watch.as_ref());
                    }
                }
                let daemon = name.to_string();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    owned.remove(pid);
                    let _ = tx.send(Msg::ChildExited {
                        daemon,
                        generation,
                        status,
                    });
                });
                self.log.info(&format!(
                    "{name}: spawned pid {pid} ({} {})",
                    program.display(),
                    args.join(" ")
                ));
                set_state(&self.log, name, d, DaemonState::Initializing);
                let ready_timeout = d.cfg.ready_timeout;
                // A worker reports its readiness; a plain program meets its `ready:` condition
                // (src/readiness.rs). Either way it must by `ready_timeout`.
                if let Some(r) = &d.cfg.ready {
                    d.reason = Some(format!("waiting until ready: {}", r.describe()));
                }
                match d.cfg.ready.clone() {
                    None if !d.cfg.protocol => {
                        d.running_since = Some(Instant::now());
                        set_state(&self.log, name, d, DaemonState::Running);
                    }
                    None | Some(Ready::Log(_)) => {}
                    Some(Ready::After(after)) => {
                        self.schedule(name, generation, TimerKind::ReadyAfter, after)
                    }
                    Some(probe) => {
                        d.probe = crate::readiness::spawn_probe(
                            &probe,
                            name.to_string(),
                            generation,
                            root.clone(),
                            tree_env(&root, &socket),
                            self.tx.clone(),
                        );
                    }
                }
                if self.daemons[name].state == DaemonState::Initializing {
                    self.schedule(name, generation, TimerKind::ReadyTimeout, ready_timeout);
                }
            }
            Err(e) => {
                if let Some(dir) = &prepared.cgroup {
                    let _ = crate::cgroup::remove(dir);
                }
                let desc = format!("cannot spawn {}: {e}", program.display());
                self.log.error(&format!("{name}: {desc}"));
                d.last_exit = Some(desc.clone());
                d.spawn_failed = true;
                set_state(&self.log, name, d, DaemonState::Initializing);
                self.after_exit(
                    name,
                    ExitInfo {
                        kind: ExitKind::Failure,
                        desc,
                    },
                );
            }
        }
    }

    /// The environment every process of this root's tree carries (daemons, jobs).
    fn tree_env(&self) -> Vec<(String, String)> {
        tree_env(&self.paths.root, &self.paths.socket.display().to_string())
    }

    fn record_processes_later(&mut self) {
        self.records_dirty = true;
    }

    fn schedule(&self, name: &str, generation: u64, kind: TimerKind, after: Duration) {
        let tx = self.tx.clone();
        let daemon = name.to_string();
        if after.is_zero() {
            // No timer for "now": the loop takes it right after the current message.
            let _ = tx.send(Msg::Timer {
                daemon,
                generation,
                kind,
            });
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Msg::Timer {
                daemon,
                generation,
                kind,
            });
        });
    }

    /// Asks a daemon's process to go: shutdown frame, SIGTERM to the group, SIGKILL after the grace
    /// period. A forced stop (`stop_signal`) sends its signal instead, at once, even to a daemon
    /// already shutting down. A daemon that reported SHUTTING_DOWN by itself gets its SIGTERM now;
    /// its grace period began with the report.
    fn begin_stop(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("known");
        if !d.state.has_process() {
            if d.state.is_wanted() {
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            return;
        }
        let already = d.state == DaemonState::ShuttingDown;
        let Some(pgid) = Self::group_of(d) else {
            if !already {
                set_state(&self.log, name, d, DaemonState::ShuttingDown);
            }
            return;
        };
        if let Some(sig) = d.stop_signal {
            set_state(&self.log, name, d, DaemonState::ShuttingDown);
            match &d.unit {
                Some(unit) if sig == Signal::SIGKILL => unit.kill(),
                Some(unit) => {
                    unit.freeze(false);
                    unit.signal(sig);
                }
                None => {
                    unix::signal_group(pgid, Signal::SIGCONT);
                    unix::signal_group(pgid, sig);
                }
            }
            d.terminated = true;
            if sig == Signal::SIGKILL {
                d.stop_how = Some("killed at once, no grace period".into());
                self.log.info(&format!(
                    "{name}: forced stop: SIGKILL to process group {pgid}"
                ));
            } else {
                self.log.info(&format!(
                    "{name}: {} to process group {pgid}, SIGKILL in {:?}",
                    sig.as_str(),
                    d.cfg.grace_period
                ));
                if !already {
                    let (generation, grace) = (d.generation, d.cfg.grace_period);
                    self.schedule(name, generation, TimerKind::Grace, grace);
                }
            }
            return;
        }
        if already && d.terminated {
            return;
        }
        set_state(&self.log, name, d, DaemonState::ShuttingDown);
        d.terminated = true;
        if let Some((_, tx)) = &d.conn {
            let _ = tx.send(FromSupervisor::Shutdown);
        }
        if let Some(unit) = &d.unit {
            if !d.cfg.protocol {
                // A frozen (paused) process cannot act on SIGTERM.
                unit.freeze(false);
            }
            // Every process of the daemon, including those that left its process group.
            unit.signal(Signal::SIGTERM);
            self.log.info(&format!(
                "{name}: SIGTERM to process group {pgid} and every process it started ({}), SIGKILL in {:?}",
                unit.kind(),
                d.cfg.grace_period
            ));
        } else {
            if !d.cfg.protocol {
                unix::signal_group(pgid, Signal::SIGCONT);
            }
            unix::signal_group(pgid, Signal::SIGTERM);
            self.log.info(&format!(
                "{name}: SIGTERM to process group {pgid}, SIGKILL in {:?}",
                d.cfg.grace_period
            ));
        }
        if !already {
            let (generation, grace) = (d.generation, d.cfg.grace_period);
            self.schedule(name, generation, TimerKind::Grace, grace);
        }
    }

    /// Kills a process the supervisor gave up on (watchdog, stall, ready timeout); the exit then restarts it.
    fn kill_for(&mut self, name: &str, cause: String) {
        let d = self.daemons.get_mut(name).expect("known");
        let Some(pid) = d.pid else { return };
        self.log.warn(&format!(
            "{name}: {cause}: SIGKILL to process group {pid} and everything it started"
        ));
        d.kill_cause = Some(cause);
        if let Some(unit) = &d.unit {
            unit.kill();
        }
    }

    fn child_exited(
        &mut self,
        name: &str,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        let Some(d) = self.daemons.get_mut(name) else {
            return;
        };
        if d.generation != generation {
            return;
        }
        let (kind, desc) = match &status {
            Ok(s) if s.success() => (ExitKind::Success, unix::describe_exit(s)),
            Ok(s) if s.code().is_some() => (ExitKind::Failure, unix::describe_exit(s)),
            Ok(s) => (ExitKind::Signaled, unix::describe_exit(s)),
            Err(e) => (ExitKind::Failure, format!("wait failed: {e}")),
        };
        let pgid = d.pid.take();
        d.conn = None;
        if let Some(p) = d.probe.take() {
            p.abort();
        }
        self.events.disconnect(name);
        d.last_exit = Some(desc.clone());
        let info = match d.kill_cause.take() {
            Some(cause) => ExitInfo {
                kind: ExitKind::Signaled,
                desc: format!("{cause} ({desc})"),
            },
            None => ExitInfo { kind, desc },
        };
        self.log.info(&format!(
            "{name}: process {} ended: {}",
            pgid.unwrap_or(0),
            info.desc
        ));
        let stopping = d.state == DaemonState::ShuttingDown;
        if let Some(pgid) = pgid
            && let Some(unit) = &d.unit
            && unit.alive()
        {
            if !stopping {
                // The leader died on its own: whatever it left behind is a stray.
                self.log.warn(&format!(
                    "{name}: killing what is left of its processes (group {pgid}, {})",
                    unit.kind()
                ));
                unit.kill();
            }
            d.draining = Some((pgid, info));
            let generation = d.generation;
            self.schedule(
                name,
                generation,
                TimerKind::DrainCheck,
                Duration::from_millis(50),
            );
            return;
        }
        self.release_unit(name);
        self.after_exit(name, info);
    }

    /// Finishes an exit once the drained unit has no process left.
    fn check_drained(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("known");
        let Some((pgid, _)) = &d.draining else { return };
        let alive = match &d.unit {
            Some(unit) => unit.alive(),
            None => unix::group_alive(*pgid),
        };
        if alive {
            return;
        }
        if let Some((_, info)) = d.draining.take() {
            self.release_unit(name);
            self.after_exit(name, info);
        }
    }

    /// The daemon's processes are all gone: remove its cgroup.
    fn release_unit(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("known");
        if let Some(unit) = d.unit.take()
            && let Err(e) = unit.remove()
        {
            self.log.warn(&format!("{name}: {e}"));
        }
    }

    /// The process group a daemon owns right now: its live leader's, or the one being drained.
    fn group_of(d: &Daemon) -> Option<u32> {
        d.pid.or(d.draining.as_ref().map(|(p, _)| *p))
    }

    /// The daemon's process group is gone: decide what comes next.
    fn after_exit(&mut self, name: &str, info: ExitInfo) {
        let now = self.started.elapsed();
        let jitter = self.jitter.next_f64();
        let d = self.daemons.get_mut(name).expect("known");
        // A daemon that ran long enough before dying starts its backoff from the beginning.
        if let Some(since) = d.running_since {
            d.history
                .note_stable(since - self.started, now, &d.cfg.restart);
        }
        d.running_since = None;
        d.spawned_at = None;
        self.records_dirty = true;
        if d.state == DaemonState::ShuttingDown || d.intent != Intent::None {
            let intent = std::mem::replace(&mut d.intent, Intent::None);
            set_state(&self.log, name, d, DaemonState::Stopped);
            if intent == Intent::Restart && self.shutting_down.is_none() {
                self.want_up(name);
            } else {
                // A stopped daemon's jobs stop with it; a restarting one keeps them and hears how they end.
                let jobs: Vec<String> = self
                    .jobs
                    .values()
                    .filter(|j| j.daemon == name)
                    .map(|j| j.id.clone())
                    .collect();
                for id in jobs {
                    self.stop_job(&id);
                }
            }
            return;
        }
        if self.shutting_down.is_some() {
            set_state(&self.log, name, d, DaemonState::Stopped);
            return;
        }
        match restart::decide_after_exit(
            &mut d.history,
            &d.cfg.restart,
            info.kind,
            &info.desc,
            now,
            jitter,
        ) {
            ExitDecision::Restart { delay, attempt } => {
                d.reason = Some(info.desc.clone());
                d.failures += 1;
                d.next_attempt = Some(Instant::now() + delay);
                self.log.warn(&format!(
                    "{name}: {}; restart #{attempt} in {} ms",
                    info.desc,
                    delay.as_millis()
                ));
                set_state(&self.log, name, d, DaemonState::Backoff);
                if delay.is_zero() {
                    // No delay configured: respawn now, before any bookkeeping of this exit.
                    d.restarts += 1;
                    self.spawn(name);
                } else {
                    let generation = d.generation;
                    self.schedule(name, generation, TimerKind::Backoff, delay);
                }
            }
            ExitDecision::Stop => {
                d.failures += 1;
                d.reason = Some(format!(
                    "{} (restart policy {})",
                    info.desc, d.cfg.restart.policy
                ));
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            ExitDecision::Fail { reason } => {
                self.log.error(&format!("{name}: FAILED: {reason}"));
                d.reason = Some(reason);
                set_state(&self.log, name, d, DaemonState::Failed);
            }
        }
    }

    fn timer(&mut self, name: &str, generation: u64, kind: TimerKind) {
        let Some(d) = self.daemons.get(name) else {
            return;
        };
        if d.generation != generation {
            return;
        }
        match kind {
            TimerKind::Backoff => {
                if d.state == DaemonState::Backoff {
                    let d = self.daemons.get_mut(name).expect("known");
                    d.restarts += 1;
                    self.spawn(name);
                }
            }
            TimerKind::Grace => {
                let pgid = Self::group_of(d);
                if d.state == DaemonState::ShuttingDown
                    && let Some(pgid) = pgid
                    && let Some(unit) = &d.unit
                    && unit.alive()
                {
                    let grace = d.cfg.grace_period;
                    self.log.warn(&format!(
                        "{name}: still running after the {grace:?} grace period: SIGKILL to process group {pgid} and every process it started ({})",
                        unit.kind()
                    ));
                    unit.kill();
                    let d = self.daemons.get_mut(name).expect("known");
                    d.stop_how = Some(format!("killed after the {grace:?} grace period"));
                }
            }
            TimerKind::ReadyTimeout => {
                if d.state == DaemonState::Initializing && d.pid.is_some() {
                    let cause = format!("not ready after {:?}", d.cfg.ready_timeout);
                    self.kill_for(name, cause);
                }
            }
            TimerKind::ReadyAfter => {
                if d.state == DaemonState::Initializing && d.pid.is_some() {
                    self.became_ready(name, generation);
                }
            }
            TimerKind::Watchdog => self.watchdog(name),
            TimerKind::DrainCheck => {
                self.check_drained(name);
                let d = &self.daemons[name];
                if d.draining.is_some() {
                    self.schedule(
                        name,
                        generation,
                        TimerKind::DrainCheck,
                        Duration::from_millis(50),
                    );
                }
            }
        }
    }

    /// A plain program met its readiness condition: it is RUNNING, and its dependents may start.
    fn became_ready(&mut self, name: &str, generation: u64) {
        let Some(d) = self.daemons.get_mut(name) else {
            return;
        };
        if d.generation != generation || d.state != DaemonState::Initializing || d.pid.is_none() {
            return;
        }
        if let Some(p) = d.probe.take() {
            p.abort();
        }
        if let Some(r) = &d.cfg.ready {
            self.log.info(&format!("{name}: ready ({})", r.describe()));
        }
        d.running_since = Some(Instant::now());
        d.reason = None;
        set_state(&self.log, name, d, DaemonState::Running);
    }

    fn watchdog(&mut self, name: &str) {
        let d = &self.daemons[name];
        if !matches!(d.state, DaemonState::Running | DaemonState::Paused) || d.pid.is_none() {
            return;
        }
        let now = Instant::now();
        // Time the supervisor itself did not run never counts against the daemon.
        let resumed = self.lag.lock().expect("lag lock").resumed_at(now);
        let last = d.last_heartbeat.or(d.running_since).unwrap_or(now);
        let windows = ringrift::watchdog::Windows {
            heartbeat_timeout: d.cfg.heartbeat_timeout,
            stall_timeout: d
                .cfg
                .stall_timeout
                .filter(|_| d.state == DaemonState::Running),
        };
        let next =
            match ringrift::watchdog::judge(now, last, d.last_progress_change, resumed, windows) {
                Verdict::Silent(silent) => {
                    let cause = format!("watchdog: no heartbeat for {:.1}s", silent.as_secs_f64());
                    self.kill_for(name, cause);
                    return;
                }
                Verdict::Stalled(flat) => {
                    let cause = format!("stalled: progress flat for {:.1}s", flat.as_secs_f64());
                    self.kill_for(name, cause);
                    return;
                }
                Verdict::Healthy { next_check } => next_check,
            };
        let generation = d.generation;
        self.schedule(
            name,
            generation,
            TimerKind::Watchdog,
            next + Duration::from_millis(5),
        );
    }

    // ------------------------------------------------------------------ workers

    /// A hello on the socket pair made for spawn `generation` of `name`: the connection is the
    /// proof of identity, so all that is left to check is that this spawn is still the current one.
    fn worker_hello(
        &mut self,
        name: &str,
        generation: u64,
        conn_id: u64,
        tx: ConnTx,
    ) -> Result<serde_json::Value, String> {
        let Some(d) = self.daemons.get_mut(name) else {
            return Err(format!("unknown daemon '{name}'"));
        };
        if d.generation != generation || d.pid.is_none() {
            return Err(format!(
                "daemon {name}'s process of this connection is gone (state {})",
                d.state
            ));
        }
        if d.conn.is_some() {
            return Err(format!("daemon {name} is already connected"));
        }
        d.conn = Some((conn_id, tx));
        d.last_heartbeat = Some(Instant::now());
        Ok(d.cfg.settings.clone())
    }

    fn worker_frame(&mut self, name: &str, conn_id: u64, frame: ToSupervisor) {
        let Some(d) = self.daemons.get_mut(name) else {
            return;
        };
        if d.conn.as_ref().is_none_or(|(id, _)| *id != conn_id) {
            return;
        }
        match frame {
            ToSupervisor::State { state, message } => {
                if let Some(m) = message {
                    d.health.message = m;
                }
                let Some(to) = lifecycle::apply_report(d.state, state) else {
                    self.log.warn(&format!(
                        "{name}: ignored report {state:?} while {}",
                        d.state
                    ));
                    return;
                };
                if to == d.state {
                    return;
                }
                if to == DaemonState::ShuttingDown && d.intent == Intent::None {
                    // The daemon decided to stop by itself: treat its exit as a stop, not a crash.
                    d.intent = Intent::Stop;
                }
                let was = d.state;
                set_state(&self.log, name, d, to);
                if to == DaemonState::ShuttingDown && d.state == to {
                    // Its grace period starts with the report, like any stop's: a worker that says
                    // it is shutting down and then hangs is killed at its end.
                    let (generation, grace) = (d.generation, d.cfg.grace_period);
                    self.schedule(name, generation, TimerKind::Grace, grace);
                    return;
                }
                if to == DaemonState::Running && was == DaemonState::Paused {
                    d.last_progress_change = Instant::now();
                }
                if to == DaemonState::Running && was == DaemonState::Initializing {
                    let now = Instant::now();
                    d.running_since = Some(now);
                    d.last_heartbeat = Some(now);
                    d.last_progress_change = now;
                    let (generation, timeout) = (
                        d.generation,
                        d.cfg
                            .heartbeat_timeout
                            .min(d.cfg.stall_timeout.unwrap_or(Duration::MAX)),
                    );
                    self.schedule(name, generation, TimerKind::Watchdog, timeout);
                }
            }
            ToSupervisor::Heartbeat { health, progress } => {
                let now = Instant::now();
                d.last_heartbeat = Some(now);
                if progress != d.progress {
                    d.last_progress_change = now;
                }
                d.health = health;
                d.progress = progress;
                if let Some(since) = d.running_since {
                    d.history
                        .note_stable(since - self.started, now - self.started, &d.cfg.restart);
                }
            }
            ToSupervisor::SpawnJob {
                request_id,
                command,
                max_runtime_secs,
                env,
            } => {
                self.spawn_job(name, request_id, command, max_runtime_secs, env);
            }
            ToSupervisor::Emit {
                event_type,
                payload,
                ..
            } => {
                let name = name.to_string();
                if let Err((code, e)) =
                    self.publish_from(Origin::Daemon(&name), &event_type, payload)
                {
                    self.log.warn(&format!("{name}: event refused: {e}"));
                    self.send_to_worker(&name, error(code, &e));
                }
            }
            ToSupervisor::Subscribe { event_types } => {
                let tx = self
                    .daemons
                    .get(name)
                    .and_then(|d| d.conn.as_ref().map(|(_, tx)| tx.clone()));
                if let Some(tx) = tx {
                    match self.events.subscribe(name, &event_types, tx) {
                        Ok(()) => self
                            .log
                            .info(&format!("{name}: subscribed to {}", event_types.join(", "))),
                        Err(e) => {
                            let e = e.to_string();
                            self.log.warn(&format!("{name}: {e}"));
                            self.send_to_worker(name, error(protocol::ErrorCode::BadRequest, &e));
                        }
                    }
                }
            }
            ToSupervisor::Ack { seq } => self.events.ack(name, seq),
            other => {
                self.log.warn(&format!(
                    "{name}: unexpected frame {} from a worker",
                    frame_name(&other)
                ));
                if let Some(d) = self.daemons.get(name)
                    && let Some((_, tx)) = &d.conn
                {
                    let _ = tx.send(error(
                        protocol::ErrorCode::UnexpectedFrame,
                        &format!("{} is not a worker frame", frame_name(&other)),
                    ));
                }
            }
        }
    }

    /// Publishes an event for `origin` after checking that it may emit that type
    /// (`ringrift::events::may_emit`); the event's `source` is the origin, never what a sender claims.
    fn publish_from(
        &mut self,
        origin: Origin<'_>,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<Arc<ringrift::events::Event>, (protocol::ErrorCode, String)> {
        if let Some(spec) = ringrift::events::find(&ringrift::events::normalize(event_type))
            && let Err(e) = ringrift::events::may_emit(spec, origin)
        {
            return Err((protocol::ErrorCode::Forbidden, e.0));
        }
        self.events
            .publish(event_type, payload, origin.as_str())
            .map_err(|e| (protocol::ErrorCode::BadRequest, e.to_string()))
    }

    // ------------------------------------------------------------------ status

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
                let usage = d
                    .pid
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
                    pid: d.pid,
                    uptime_secs: d.spawned_at.map(|t| round3((now - t).as_secs_f64())),
                    restarts: d.restarts,
                    health,
                    heartbeat_age_secs: if d.cfg.protocol && d.pid.is_some() {
                        d.last_heartbeat.map(|t| round3((now - t).as_secs_f64()))
                    } else {
                        None
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
                        d.unit
                            .as_ref()
                            .map_or(self.containment.kind(), |u| u.kind())
                            .to_string(),
                    ),
                    containment_problems: d
                        .unit
                        .as_ref()
                        .map(|u| u.why_not.iter().chain(&u.limit_problems).cloned().collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
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
        }
    }

    // ------------------------------------------------------------------ signals, reload, shutdown

    fn signal(&mut self, kind: SignalKind) {
        match kind {
            SignalKind::Hangup => {
                self.log.info("SIGHUP: reloading the configuration");
                self.reload(None);
            }
            SignalKind::Terminate => {
                self.log
                    .info("SIGTERM: stopping every daemon, dependents first");
                self.begin_shutdown(None);
            }
            SignalKind::Interrupt => {
                self.interrupts += 1;
                if self.interrupts == 1 {
                    self.log.info("SIGINT: stopping every daemon, dependents first (interrupt again to kill them all at once)");
                    self.begin_shutdown(None);
                } else {
                    self.log
                        .warn("second SIGINT: SIGKILL to every process group");
                    self.kill_everything();
                    self.finish_shutdown();
                }
            }
        }
    }

    pub(crate) fn kill_everything(&mut self) {
        for d in self.daemons.values() {
            if let Some(unit) = &d.unit {
                unit.kill();
            } else if let Some(p) = Self::group_of(d) {
                unix::signal_group(p, Signal::SIGCONT);
                unix::signal_group(p, Signal::SIGKILL);
            }
        }
        for j in self.jobs.values() {
            j.unit.kill();
        }
    }

    fn begin_shutdown(&mut self, reply: Option<Reply>) {
        let replies = self.shutting_down.get_or_insert_with(Vec::new);
        if let Some(r) = reply {
            replies.push(r);
        }
        let names: Vec<String> = self.daemons.keys().cloned().collect();
        for name in names {
            self.want_down(&name);
        }
    }

    fn send_to_worker(&self, name: &str, frame: FromSupervisor) {
        if let Some((_, tx)) = self.daemons.get(name).and_then(|d| d.conn.as_ref()) {
            let _ = tx.send(frame);
        }
    }

    /// Writes the subscribers' positions now, or soon: at most a few times a second, whatever the ack rate.
    fn flush_events(&mut self) {
        if !self.events.dirty {
            return;
        }
        let since = self.last_flush.elapsed();
        if since >= EVENT_FLUSH_EVERY {
            self.last_flush = Instant::now();
            if let Err(e) = self.events.save() {
                self.log
                    .warn(&format!("cannot save event subscribers: {e}"));
            }
        } else if !self.flush_pending {
            self.flush_pending = true;
            let tx = self.tx.clone();
            let wait = EVENT_FLUSH_EVERY - since;
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tx.send(Msg::FlushEvents);
            });
        }
    }

    /// DAEMON_STARTED / DAEMON_STOPPED / DAEMON_FAILED for every state change since the last look.
    fn announce(&mut self) {
        let mut out = Vec::new();
        for d in self.daemons.values_mut() {
            let (was, now) = (d.announced, d.state);
            let respawned = d.generation != d.announced_generation;
            d.announced_generation = d.generation;
            if was == now && !respawned {
                continue;
            }
            d.announced = now;
            let name = d.cfg.name.clone();
            // A process that died and was replaced before this look (a restart without delay):
            // its end is announced all the same.
            if respawned
                && matches!(was, DaemonState::Running | DaemonState::Paused)
                && now == DaemonState::Initializing
            {
                out.push((
                    "DAEMON_STOPPED",
                    ringrift::events::payload([
                        ("daemon", name.clone().into()),
                        (
                            "last_exit",
                            d.last_exit
                                .clone()
                                .map(Into::into)
                                .unwrap_or(serde_json::Value::Null),
                        ),
                        (
                            "reason",
                            d.reason
                                .clone()
                                .map(Into::into)
                                .unwrap_or(serde_json::Value::Null),
                        ),
                    ]),
                ));
            }
            match now {
                DaemonState::Running if was != DaemonState::Paused => out.push((
                    "DAEMON_STARTED",
                    ringrift::events::payload([
                        ("daemon", name.into()),
                        ("pid", d.pid.unwrap_or(0).into()),
                    ]),
                )),
                DaemonState::Stopped | DaemonState::Backoff
                    if matches!(
                        was,
                        DaemonState::Running
                            | DaemonState::Paused
                            | DaemonState::ShuttingDown
                            | DaemonState::Initializing
                    ) =>
                {
                    out.push((
                        "DAEMON_STOPPED",
                        ringrift::events::payload([
                            ("daemon", name.into()),
                            (
                                "last_exit",
                                d.last_exit
                                    .clone()
                                    .map(Into::into)
                                    .unwrap_or(serde_json::Value::Null),
                            ),
                            (
                                "reason",
                                d.reason
                                    .clone()
                                    .map(Into::into)
                                    .unwrap_or(serde_json::Value::Null),
                            ),
                        ]),
                    ))
                }
                DaemonState::Failed => out.push((
                    "DAEMON_FAILED",
                    ringrift::events::payload([
                        ("daemon", name.into()),
                        ("reason", d.reason.clone().unwrap_or_default().into()),
                    ]),
                )),
                _ => {}
            }
        }
        for (t, p) in out {
            if let Err(e) = self.events.publish(t, p, "supervisor") {
                self.log.warn(&format!("cannot publish {t}: {e}"));
            }
        }
    }

    fn finish_shutdown(&mut self) {
        self.announce();
        if self.events.dirty
            && let Err(e) = self.events.save()
        {
            self.log
                .warn(&format!("cannot save event subscribers: {e}"));
        }
        // The cgroup subtree goes before anyone hears "shut down" (killing whatever is left in it).
        if let Err(e) = self.containment.teardown() {
            self.log
                .warn(&format!("cannot remove the cgroup subtree: {e}"));
        }
        self.log.info("every daemon is stopped; supervisor exiting");
        // Gone from the file system before anyone hears "shut down": a `start` right after must boot
        // anew. Cleared first, so that the run/ keeper does not make it again.
        *self.socket_id.lock().expect("socket id lock") = None;
        let _ = std::fs::remove_file(&self.paths.socket);
        let _ = std::fs::remove_file(&self.paths.pid_file);
        for r in self.shutting_down.take().unwrap_or_default() {
            let _ = r.send(FromSupervisor::Done {
                ok: true,
                results: vec![OpResult {
                    name: "supervisor".into(),
                    ok: true,
                    message: "shut down".into(),
                }],
            });
        }
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(error(
                protocol::ErrorCode::ShuttingDown,
                "the supervisor shut down",
            ));
        }
        self.exit_now = true;
    }

    fn reload(&mut self, reply: Option<Reply>) {
        let new =
            match ringrift::config::load_checked(&self.paths.root, self.config_path.as_deref()) {
                Ok((c, missing)) => {
                    for p in missing {
                        self.log.warn(&format!("reload: {p}"));
                    }
                    c
                }
                Err(e) => {
                    self.log.error(&format!(
                        "reload refused, keeping the running configuration: {e}"
                    ));
                    if let Some(r) = reply {
                        let _ = r.send(error(protocol::ErrorCode::Config, &e.to_string()));
                    }
                    return;
                }
            };
        let mut results = Vec::new();
        let old_names: BTreeSet<String> = self.daemons.keys().cloned().collect();
        let new_names: BTreeSet<String> = new.daemons.keys().cloned().collect();
        for name in old_names.difference(&new_names) {
            self.want_down(name);
            results.push(OpResult {
                name: name.clone(),
                ok: true,
                message: "removed: stopping".into(),
            });
        }
        for name in new_names.difference(&old_names) {
            let cfg = new.daemons[name].clone();
            let enabled = cfg.enabled;
            self.daemons.insert(name.clone(), Daemon::new(cfg));
            if enabled {
                self.want_up(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "added: starting".into(),
                });
            }
        }
        for name in old_names.intersection(&new_names) {
            let new_cfg = new.daemons[name].clone();
            let d = self.daemons.get_mut(name).expect("known");
            if d.cfg == new_cfg {
                continue;
            }
            let action = ringrift::reload::classify(&d.cfg, &new_cfg);
            let was_enabled = d.cfg.enabled;
            d.cfg = new_cfg;
            let (state, enabled) = (d.state, d.cfg.enabled);
            if was_enabled && !enabled {
                self.want_down(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "disabled: stopping".into(),
                });
            } else if !was_enabled && enabled && state.is_at_rest() {
                self.want_up(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "enabled: starting".into(),
                });
            } else if let ReloadAction::InPlace(keys) = &action {
                // Policy only: the next decision (restart, grace, watchdog) uses the new values.
                // Readiness is judged once per process: a process already being checked (or
                // already ready) keeps the condition it started with.
                let (next_start, now): (Vec<&String>, Vec<&String>) = keys
                    .iter()
                    .partition(|k| matches!(k.as_str(), "ready" | "ready_timeout"));
                let mut parts = Vec::new();
                if !now.is_empty() {
                    let now: Vec<&str> = now.iter().map(|k| k.as_str()).collect();
                    parts.push(format!("changed {}: applied in place", now.join(", ")));
                }
                if !next_start.is_empty() {
                    let later: Vec<&str> = next_start.iter().map(|k| k.as_str()).collect();
                    parts.push(format!(
                        "changed {}: used from its next start",
                        later.join(", ")
                    ));
                }
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: parts.join("; "),
                });
            } else if action == ReloadAction::JobTemplates {
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "job templates changed: used from its next start (no restart)".into(),
                });
            } else if let ReloadAction::Restart(keys) = &action
                && state.has_process()
                && state != DaemonState::ShuttingDown
            {
                let message = format!("changed {}: restarting", keys.join(", "));
                let d = self.daemons.get_mut(name).expect("known");
                d.intent = Intent::Restart;
                self.begin_stop(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message,
                });
            } else {
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "changed".into(),
                });
            }
        }
        self.config = new;
        // Removed daemons are dropped once they are at rest.
        let gone: Vec<String> = old_names.difference(&new_names).cloned().collect();
        for name in gone {
            if self.daemons[&name].state.is_at_rest() {
                self.daemons.remove(&name);
            }
        }
        self.log.info(&format!(
            "configuration reloaded: {}",
            if results.is_empty() {
                "no change".to_string()
            } else {
                results
                    .iter()
                    .map(|r| format!("{} {}", r.name, r.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        ));
        if let Some(r) = reply {
            let _ = r.send(FromSupervisor::Done { ok: true, results });
        }
    }
}

impl Daemon {
    fn new(cfg: DaemonConfig) -> Daemon {
        Daemon {
            cfg,
            state: DaemonState::Stopped,
            pid: None,
            generation: 0,
            spawned_at: None,
            running_since: None,
            restarts: 0,
            history: RestartHistory::new(),
            health: Health::default(),
            progress: BTreeMap::new(),
            last_heartbeat: None,
            last_progress_change: Instant::now(),
            conn: None,
            last_exit: None,
            reason: None,
            intent: Intent::None,
            kill_cause: None,
            draining: None,
            unit: None,
            stop_queued: false,
            stop_overrides: 0,
            failures: 0,
            spawn_failed: false,
            next_attempt: None,
            stop_signal: None,
            terminated: false,
            stop_how: None,
            probe: None,
            announced: DaemonState::Stopped,
            announced_generation: 0,
            log: None,
        }
    }
}

/// The one place a daemon's state changes: checked against the lifecycle rules and logged.
/// Copies a child's output into its log, through the `ready: {log: ...}` watch when there is one.
fn spawn_pump<R>(
    reader: R,
    stream: logwriter::Stream,
    log: &SharedLog,
    watch: Option<&crate::readiness::SharedWatch>,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    match watch {
        Some(w) => tokio::spawn(logwriter::pump(
            crate::readiness::WatchOutput::new(reader, w.clone()),
            stream,
            log.clone(),
        )),
        None => tokio::spawn(logwriter::pump(reader, stream, log.clone())),
    };
}

fn set_state(log: &SupervisorLog, name: &str, d: &mut Daemon, to: DaemonState) {
    if d.state == to {
        return;
    }
    match lifecycle::transition(d.state, to) {
        Ok(to) => {
            log.info(&format!("{name}: {} → {to}", d.state));
            d.state = to;
        }
        Err(e) => log.error(&format!("{name}: refused {e}")),
    }
}

fn tree_env(root: &std::path::Path, socket: &str) -> Vec<(String, String)> {
    vec![
        (protocol::SOCKET_ENV.to_string(), socket.to_string()),
        (protocol::ROOT_ENV.to_string(), root.display().to_string()),
        (
            protocol::SUPERVISOR_PID_ENV.to_string(),
            std::process::id().to_string(),
        ),
    ]
}

/// A signal as users write it: `KILL`, `SIGKILL`, `kill` or `9`.
fn parse_signal(text: &str) -> Result<Signal, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{n} is not a signal number"));
    }
    let upper = t.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>().map_err(|_| {
        format!("unknown signal '{text}' (e.g. KILL, TERM, INT, HUP, USR1, or a number)")
    })
}

fn error(code: protocol::ErrorCode, message: &str) -> FromSupervisor {
    FromSupervisor::Error {
        code,
        message: message.to_string(),
    }
}

pub(crate) fn frame_name(f: &ToSupervisor) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "frame".into())
}

fn dependents_in(graph: &deps::Graph, name: &str, requested: &BTreeSet<String>) -> String {
    let users: Vec<&str> = requested
        .iter()
        .filter(|r| {
            deps::with_dependencies(graph, &[r.to_string()].into_iter().collect()).contains(name)
        })
        .map(String::as_str)
        .collect();
    users.join(", ")
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_read_as_users_write_them() {
        for text in ["KILL", "SIGKILL", "kill", "9", " Kill "] {
            assert_eq!(parse_signal(text), Ok(Signal::SIGKILL), "{text}");
        }
        assert_eq!(parse_signal("int"), Ok(Signal::SIGINT));
        assert!(
            parse_signal("BOGUS")
                .unwrap_err()
                .contains("unknown signal 'BOGUS'")
        );
        assert!(
            parse_signal("999")
                .unwrap_err()
                .contains("not a signal number")
        );
    }
}
