//! One daemon's record in the core: its configuration, state and restart bookkeeping, and the
//! [`Process`] it runs, if any.

use super::*;

/// What the supervisor means to do with a daemon whose process is going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    None,
    Stop,
    Restart,
}

/// One daemon as the core knows it: what outlives its processes (configuration, state, restart
/// bookkeeping, what the last run left for `status` and waiting requests) and, while there is
/// one, its current process.
pub(super) struct Daemon {
    pub(super) cfg: DaemonConfig,
    pub(super) state: DaemonState,
    /// The current spawn, from a successful spawn until it and every process it started are gone
    /// (`after_exit`); None: no process.
    pub(super) process: Option<Process>,
    /// Bumped at every spawn: timers and exits of an older process are ignored.
    pub(super) generation: u64,
    /// Respawns after failures (from BACKOFF), for `status`.
    pub(super) restarts: u32,
    pub(super) history: RestartHistory,
    /// What the worker last reported (health, progress counters): kept after its process ends,
    /// for `status`, and cleared at the next spawn.
    pub(super) health: Health,
    pub(super) progress: BTreeMap<String, u64>,
    /// How the last process ended (`exit 1`, `killed by SIGKILL`, `cannot spawn ...`).
    pub(super) last_exit: Option<String>,
    /// Why the daemon is in its state (waiting for a dependency, backing off, failed).
    pub(super) reason: Option<String>,
    pub(super) intent: Intent,
    /// A stop was requested but dependents must go first.
    pub(super) stop_queued: bool,
    /// Bumped each time a start or restart overrides a stop still under way: a stop request
    /// waiting for this daemon then answers "stop overridden".
    pub(super) stop_overrides: u64,
    /// Bumped each time an attempt to run the daemon failed (it went to BACKOFF).
    pub(super) failures: u64,
    /// The last attempt failed at spawn (the program could not be started at all).
    pub(super) spawn_failed: bool,
    /// When the next attempt is due, while in BACKOFF.
    pub(super) next_attempt: Option<Instant>,
    /// How the last stop ended when the supervisor had to force it, for the stop's answer (read
    /// once the process is gone; cleared at the next spawn).
    pub(super) stop_how: Option<String>,
    /// The state last published as a DAEMON_* event, and the process generation it was about.
    pub(super) announced: DaemonState,
    pub(super) announced_generation: u64,
    /// The daemon's output log, opened at its first spawn and kept across restarts.
    pub(super) log: Option<SharedLog>,
    /// Its leases by name (`catalog::leases`), for a cluster-scoped daemon of a node in a
    /// cluster (empty: it acts on its own).
    pub(super) leases: BTreeMap<String, protocol::LeaseInfo>,
}

/// Everything that belongs to one spawned process of a daemon. Created when a spawn succeeds,
/// dropped once the leader has exited and every process it started is gone (`after_exit`), so
/// none of it can leak into the next spawn.
pub(super) struct Process {
    /// Every process of this spawn: its cgroup, or its process group + environment. Its `pgid` is
    /// the leader's pid (each daemon leads its own group).
    pub(super) unit: Unit,
    /// The leader has exited (how, for `after_exit`): the rest of its group or cgroup is being
    /// drained. None while the leader lives.
    pub(super) draining: Option<ExitInfo>,
    /// When the process was spawned (`status` uptime).
    pub(super) spawned_at: Instant,
    /// When it became RUNNING (None before): the watchdog's first window, and how long it ran
    /// stably for the restart backoff.
    pub(super) running_since: Option<Instant>,
    /// The worker's connection (its id and outgoing stream), from its hello until it hangs up or
    /// the leader exits.
    pub(super) conn: Option<(u64, ConnTx)>,
    /// The worker's last heartbeat (or hello, or RUNNING report), for the watchdog and `status`.
    pub(super) last_heartbeat: Option<Instant>,
    /// When the progress counters last changed (or the process was spawned or resumed), for the
    /// stall watchdog.
    pub(super) last_progress_change: Instant,
    /// The readiness probe of this spawn, aborted when it is ready or the leader exits.
    pub(super) probe: Option<tokio::task::AbortHandle>,
    /// Set when the supervisor itself killed the process (watchdog, stalled, ready timeout): the
    /// exit is then reported with this cause.
    pub(super) kill_cause: Option<String>,
    /// A forced stop's signal (`stop --force`: SIGKILL; `kill --signal`): no shutdown frame, no
    /// SIGTERM. Set while the stop may still be queued behind dependents; a start cancels it.
    pub(super) stop_signal: Option<Signal>,
    /// This process's stop has been signalled (SIGTERM or the forced signal).
    pub(super) terminated: bool,
}

impl Process {
    /// A process just spawned into `unit`.
    pub(super) fn new(unit: Unit) -> Process {
        Process {
            unit,
            draining: None,
            spawned_at: Instant::now(),
            running_since: None,
            conn: None,
            last_heartbeat: None,
            last_progress_change: Instant::now(),
            probe: None,
            kill_cause: None,
            stop_signal: None,
            terminated: false,
        }
    }

    /// The process group: the leader's pid, also once the leader has exited.
    pub(super) fn pgid(&self) -> u32 {
        self.unit.pgid
    }

    /// The leader is still running (its exit has not been seen).
    pub(super) fn leader_alive(&self) -> bool {
        self.draining.is_none()
    }

    /// Stops the readiness probe, if one runs.
    pub(super) fn abort_probe(&mut self) {
        if let Some(p) = self.probe.take() {
            p.abort();
        }
    }
}

/// How a daemon's leader process ended, as `after_exit` judges it.
#[derive(Debug, Clone)]
pub(super) struct ExitInfo {
    pub(super) kind: ExitKind,
    pub(super) desc: String,
}

impl Daemon {
    pub(super) fn new(cfg: DaemonConfig) -> Daemon {
        Daemon {
            cfg,
            state: DaemonState::Stopped,
            process: None,
            generation: 0,
            restarts: 0,
            history: RestartHistory::new(),
            health: Health::default(),
            progress: BTreeMap::new(),
            last_exit: None,
            reason: None,
            intent: Intent::None,
            stop_queued: false,
            stop_overrides: 0,
            failures: 0,
            spawn_failed: false,
            next_attempt: None,
            stop_how: None,
            announced: DaemonState::Stopped,
            announced_generation: 0,
            leases: BTreeMap::new(),
            log: None,
        }
    }

    /// The pid of the running leader: None without a process, or while what it left is drained.
    pub(super) fn pid(&self) -> Option<u32> {
        self.live().map(Process::pgid)
    }

    /// The process group the daemon owns right now: its live leader's, or the one being drained.
    pub(super) fn group(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pgid)
    }

    /// The process while its leader runs.
    pub(super) fn live(&self) -> Option<&Process> {
        self.process.as_ref().filter(|p| p.leader_alive())
    }

    /// The process while its leader runs, to change.
    pub(super) fn live_mut(&mut self) -> Option<&mut Process> {
        self.process.as_mut().filter(|p| p.leader_alive())
    }

    /// The leader has exited and the rest of its processes are being drained.
    pub(super) fn is_draining(&self) -> bool {
        self.process.as_ref().is_some_and(|p| !p.leader_alive())
    }

    /// True when `conn_id` is the worker's current connection (frames of any other are stale).
    pub(super) fn is_connection(&self, conn_id: u64) -> bool {
        self.process
            .as_ref()
            .and_then(|p| p.conn.as_ref())
            .is_some_and(|(id, _)| *id == conn_id)
    }

    /// The worker's outgoing stream, while it is connected.
    pub(super) fn conn(&self) -> Option<&ConnTx> {
        self.process
            .as_ref()
            .and_then(|p| p.conn.as_ref())
            .map(|(_, tx)| tx)
    }
}

/// The one place a daemon's state changes: checked against the lifecycle rules and logged.
pub(super) fn set_state(log: &SupervisorLog, name: &str, d: &mut Daemon, to: DaemonState) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn daemon() -> Daemon {
        let c = ringrift::config::parse("daemons:\n  x:\n    command: [sh]\n", "t.yaml", &[])
            .expect("valid config");
        Daemon::new(c.daemons["x"].clone())
    }

    /// A process led by `pid`, contained by the fallback (no cgroup is made, nothing is signalled).
    fn process(d: &Daemon, pid: u32) -> Process {
        let nowhere = Path::new("/nonexistent");
        let (containment, _) = Containment::new(nowhere, nowhere, Some("tests"));
        let member = Member::Daemon(d.cfg.name.clone());
        let prepared = containment.prepare(&member, &d.cfg.limits);
        Process::new(containment.unit(member, pid, prepared))
    }

    #[test]
    fn a_daemon_without_a_process_has_no_pid_group_or_connection() {
        let d = daemon();
        assert!(d.process.is_none());
        assert_eq!((d.pid(), d.group()), (None, None));
        assert!(d.live().is_none() && !d.is_draining());
        assert!(d.conn().is_none() && !d.is_connection(1));
    }

    #[test]
    fn a_running_leader_is_the_pid_and_the_group() {
        let mut d = daemon();
        d.process = Some(process(&d, 4242));
        assert_eq!((d.pid(), d.group()), (Some(4242), Some(4242)));
        assert!(d.live().is_some() && d.live_mut().is_some());
        assert!(!d.is_draining());
    }

    #[test]
    fn while_draining_the_group_stays_but_the_pid_is_gone() {
        let mut d = daemon();
        let mut p = process(&d, 4242);
        p.draining = Some(ExitInfo {
            kind: ExitKind::Failure,
            desc: "exit 1".into(),
        });
        d.process = Some(p);
        assert_eq!((d.pid(), d.group()), (None, Some(4242)));
        assert!(d.is_draining());
        assert!(d.live().is_none() && d.live_mut().is_none());
    }

    #[test]
    fn only_the_current_connection_counts() {
        let mut d = daemon();
        let mut p = process(&d, 4242);
        let (tx, _rx) = ConnTx::new(1024);
        p.conn = Some((7, tx));
        d.process = Some(p);
        assert!(d.is_connection(7));
        assert!(!d.is_connection(8));
        assert!(d.conn().is_some());
        // The connection belongs to the process: without one, no frame is current.
        d.process = None;
        assert!(!d.is_connection(7));
    }
}
