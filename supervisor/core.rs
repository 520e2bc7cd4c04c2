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
use ringrift::plan;
use ringrift::protocol::{
    self, DaemonStatus, ErrorCode, FromSupervisor, Health, OpResult, StatusReport, SupervisorInfo,
};
use ringrift::readiness::Ready;
use ringrift::restart::{self, ExitDecision, ExitKind, Jitter, RestartHistory};
use ringrift::watchdog::{LagDetector, Verdict};
use tokio::sync::{mpsc, oneshot};

use crate::containment::{Containment, Member, Unit};
use crate::logwriter::{self, RotatingFile, SharedLog, SupervisorLog};
use crate::paths::Paths;
use crate::unix::{self, OwnedPids, SpawnSpec};

mod announce;
mod daemon;
mod exit;
mod jobs;
mod reload;
mod requests;
mod shutdown;
mod spawn;
mod status;
mod stop;
mod timers;
mod waiters;
pub(crate) mod workers;
use daemon::{Daemon, ExitInfo, Intent, Process, set_state};
use jobs::{Job, JobTimer};
use waiters::{Goal, Waiter};

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
        reply: oneshot::Sender<
            Result<(serde_json::Value, Vec<protocol::LeaseInfo>), workers::HelloRefused>,
        >,
    },
    WorkerFrame {
        daemon: String,
        conn_id: u64,
        frame: protocol::WorkerFrame,
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
        frame: protocol::Request,
        reply: Reply,
        /// The connection's outgoing stream, for answers of more than one frame (events).
        stream: Option<ConnTx>,
        from: Requester,
    },
    /// Time to write the subscribers' positions.
    FlushEvents,
    /// run/ was deleted and has been made again: rewrite what the supervisor keeps there.
    RunDirRecreated,
    /// Time to prune logs/jobs/ (deferred: at most once a second).
    PruneJobLogs,
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
    /// An event another node of the cluster published (supervisor/cluster/bus.rs): logged and
    /// delivered like a local one once its provenance checks out. The reply says it was handled
    /// (taken, a duplicate, or refused), so the bus may acknowledge it.
    RemoteEvent {
        node: String,
        event: ringrift::events::Event,
        reply: oneshot::Sender<()>,
    },
    /// A cluster-scoped daemon's lease changed (supervisor/cluster/lease.rs).
    Lease {
        daemon: String,
        lease: protocol::LeaseInfo,
    },
    /// This node lost the claim of a shared work item (supervisor/cluster/work.rs): its job stops.
    WorkLost {
        item: i64,
    },
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
    /// When logs/jobs/ was last pruned ([`Core::prune_job_logs`]).
    job_logs_pruned: Option<Instant>,
    /// A deferred prune of logs/jobs/ is on its way ([`Msg::PruneJobLogs`]).
    job_logs_prune_due: bool,
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
    /// The cluster membership view (`cluster.enabled`), kept by supervisor/cluster.rs.
    pub(crate) cluster: Option<crate::cluster::View>,
    /// The shared work queue's task, once this node is on the bus (`cluster.enabled`).
    pub(crate) work: Option<crate::cluster::work::Slot>,
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
            job_logs_pruned: None,
            job_logs_prune_due: false,
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
            cluster: None,
            work: None,
            lag: Arc::new(Mutex::new(LagDetector::new(Instant::now()))),
        }
    }

    /// These daemons stand by until this node holds their lease (cluster-scoped daemons of a node
    /// in a cluster): their workers hear so in their welcome.
    pub(crate) fn mark_cluster_scoped(&mut self, leases: &[crate::cluster::Wanted]) {
        for w in leases {
            if let Some(d) = self.daemons.get_mut(&w.daemon) {
                d.leases.insert(
                    w.name.clone(),
                    protocol::LeaseInfo::unknown(w.config_key.clone()),
                );
            }
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
                    && d.is_connection(conn_id)
                    && let Some(p) = d.process.as_mut()
                {
                    p.conn = None;
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
            Msg::PruneJobLogs => {
                self.job_logs_prune_due = false;
                self.prune_job_logs();
            }
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
                    .filter(|(_, d)| d.is_draining())
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in draining {
                    self.check_drained(&name);
                }
            }
            Msg::Signal(kind) => self.signal(kind),
            Msg::WorkLost { item } => self.work_lost(item),
            Msg::Ready { daemon, generation } => self.became_ready(&daemon, generation),
            Msg::WaiterDeadline { id } => self.waiter_deadline(id),
            Msg::JobExited { job_id, status } => self.on_job_exited(&job_id, status),
            Msg::JobTimer { job_id, kind } => self.on_job_timer(&job_id, kind),
            Msg::Lease { daemon, lease } => {
                let name = ringrift::catalog::lease_name(&daemon, lease.config_key.as_deref());
                if let Some(d) = self.daemons.get_mut(&daemon) {
                    let was = d.leases.insert(name, lease.clone());
                    // The worker hears of a change of holder; a renewal changes only the token,
                    // which stays here (it is stamped on the daemon's events).
                    if was.is_none_or(|w| w.leader != lease.leader || w.holder != lease.holder) {
                        self.send_to_worker(&daemon, FromSupervisor::Lease(lease));
                    }
                }
            }
            Msg::RemoteEvent { node, event, reply } => {
                self.take_remote(&node, event);
                let _ = reply.send(());
            }
        }
    }

    // ------------------------------------------------------------------ requests from the CLI

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

    /// Carries out one step of `ringrift::plan::settle`.
    fn carry_out(&mut self, step: plan::Step) {
        match step {
            plan::Step::Stop(name) => {
                let d = self.daemons.get_mut(&name).expect("known");
                d.stop_queued = false;
                if d.intent != Intent::Restart {
                    d.intent = Intent::Stop;
                }
                self.begin_stop(&name);
            }
            // Checked again: an earlier step of the pass may have moved it (a failed spawn).
            plan::Step::Spawn(name) if self.daemons[&name].state == DaemonState::Waiting => {
                self.spawn(&name)
            }
            plan::Step::Wait { name, reason } => {
                self.daemons.get_mut(&name).expect("known").reason = Some(reason);
            }
            plan::Step::GiveUp { name, reason }
                if self.daemons[&name].state == DaemonState::Waiting =>
            {
                self.log.warn(&format!("{name}: {reason}"));
                let d = self.daemons.get_mut(&name).expect("known");
                d.reason = Some(reason);
                set_state(&self.log, &name, d, DaemonState::Stopped);
            }
            plan::Step::Spawn(_) | plan::Step::GiveUp { .. } => {}
        }
    }

    fn settle(&mut self) {
        let graph = self.config.graph();
        // Ask `ringrift::plan::settle`, carry out its steps, ask again until nothing moves: a
        // spawn can make a dependent startable at once, a failed one leaves it unable to start.
        // Each pass that moves takes a daemon out of WAITING or sends a queued stop, so this ends
        // within a pass per daemon; the bound only guards against a bug, which it reports.
        let mut at_rest = false;
        for _ in 0..=self.daemons.len() + 1 {
            let view: BTreeMap<String, plan::View> = self
                .daemons
                .iter()
                .map(|(n, d)| {
                    let v = plan::View {
                        state: d.state,
                        stop_queued: d.stop_queued,
                    };
                    (n.clone(), v)
                })
                .collect();
            let steps = plan::settle(&graph, &view, self.shutting_down.is_none());
            let again = plan::moves(&steps);
            for step in steps {
                self.carry_out(step);
            }
            if !again {
                at_rest = true;
                break;
            }
        }
        if !at_rest {
            self.log
                .warn("settling did not come to rest; the next message moves on from here");
        }
        self.resolve_waiters();
        if self.shutting_down.is_some()
            && self
                .daemons
                .values()
                .all(|d| d.state.is_at_rest() && d.pid().is_none())
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
                .filter_map(|d| d.group().map(|p| (p, d.cfg.name.clone())))
                .collect();
            live.extend(self.jobs.values().map(|j| (j.pid, format!("job {}", j.id))));
            // Each group's start time is read once, when it is first recorded.
            self.start_times
                .retain(|pgid, _| live.iter().any(|(p, _)| p == pgid));
            let live: Vec<(u32, u64, String)> = live
                .into_iter()
                .map(|(pgid, what)| {
                    let start = *self.start_times.entry(pgid).or_insert_with(|| {
                        ringrift::procfs::stat(pgid)
                            .map(|s| s.start_time)
                            .unwrap_or(0)
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

    // ------------------------------------------------------------------ workers

    // ------------------------------------------------------------------ status

    // ------------------------------------------------------------------ signals, reload, shutdown
}

/// A refusal with its code; `message` is what the client prints.
fn error(code: ErrorCode, message: impl std::fmt::Display) -> FromSupervisor {
    FromSupervisor::Error {
        code,
        message: message.to_string(),
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
