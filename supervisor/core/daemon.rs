//! One daemon's record in the core: its configuration, state, process and restart bookkeeping.

use super::*;

/// What the supervisor means to do with a daemon whose process is going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    None,
    Stop,
    Restart,
}

pub(super) struct Daemon {
    pub(super) cfg: DaemonConfig,
    pub(super) state: DaemonState,
    pub(super) pid: Option<u32>,
    /// Bumped at every spawn: timers and exits of an older process are ignored.
    pub(super) generation: u64,
    pub(super) spawned_at: Option<Instant>,
    pub(super) running_since: Option<Instant>,
    pub(super) restarts: u32,
    pub(super) history: RestartHistory,
    pub(super) health: Health,
    pub(super) progress: BTreeMap<String, u64>,
    pub(super) last_heartbeat: Option<Instant>,
    pub(super) last_progress_change: Instant,
    pub(super) conn: Option<(u64, ConnTx)>,
    pub(super) last_exit: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) intent: Intent,
    /// Set when the supervisor itself killed the process (watchdog, stalled, ready timeout).
    pub(super) kill_cause: Option<String>,
    /// The leader has exited; waiting for the rest of its process group (this pgid) to go.
    pub(super) draining: Option<(u32, ExitInfo)>,
    /// Every process of the current (or draining) spawn: its cgroup or its group + environment.
    pub(super) unit: Option<Unit>,
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
    /// A forced stop's signal (`stop --force`: SIGKILL; `kill --signal`): no shutdown frame, no SIGTERM.
    pub(super) stop_signal: Option<Signal>,
    /// This spawn's stop has been signalled (SIGTERM or the forced signal).
    pub(super) terminated: bool,
    /// How the last stop ended when the supervisor had to force it, for the stop's answer.
    pub(super) stop_how: Option<String>,
    /// The readiness probe of this spawn, aborted when the process ends.
    pub(super) probe: Option<tokio::task::AbortHandle>,
    /// The state last published as a DAEMON_* event, and the process generation it was about.
    pub(super) announced: DaemonState,
    pub(super) announced_generation: u64,
    pub(super) log: Option<SharedLog>,
}

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
