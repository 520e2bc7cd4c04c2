//! Daemon lifecycle: the states a daemon can be in and which moves between them are legal.
//!
//! ```text
//! STOPPED → WAITING → INITIALIZING → RUNNING ⇄ PAUSED
//!              │            │           │        │
//!              └────────────┴───────────┴────────┴──→ SHUTTING_DOWN → STOPPED
//! any live state ──(process died)──→ BACKOFF ──→ INITIALIZING      FAILED: restart budget exhausted
//! ```
//!
//! WAITING means "start requested, waiting for dependencies"; BACKOFF means "died, restart scheduled".
//! Both are additions to the seed's five states so that `status` never shows a daemon as STOPPED while
//! the supervisor still intends to run it.

use serde::{Deserialize, Serialize};

use crate::protocol::ReportedState;

/// The state of one daemon as the supervisor tracks it (the diagram above); written in upper case
/// (`SHUTTING_DOWN`) in `status`, JSON and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DaemonState {
    /// No process and none wanted: never started, stopped, or a daemon that decided to stop.
    Stopped,
    /// Start requested, waiting for its dependencies to be RUNNING or PAUSED.
    Waiting,
    /// Process spawned, not yet ready (no RUNNING report, or its `ready:` condition not yet met).
    Initializing,
    /// Ready and working.
    Running,
    /// Alive but idle: a worker told to pause, or a plain program frozen (cgroup freeze or SIGSTOP).
    Paused,
    /// Being stopped: shutdown frame and SIGTERM sent, SIGKILL at the end of the grace period.
    ShuttingDown,
    /// Its process died; a restart is scheduled after the backoff delay.
    Backoff,
    /// Restart budget exhausted (`max_restarts` within `restart_window`); keeps its reason until
    /// `start` or `restart`.
    Failed,
}

impl DaemonState {
    /// The upper-case name, as shown by `status` and in JSON (`"SHUTTING_DOWN"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Stopped => "STOPPED",
            DaemonState::Waiting => "WAITING",
            DaemonState::Initializing => "INITIALIZING",
            DaemonState::Running => "RUNNING",
            DaemonState::Paused => "PAUSED",
            DaemonState::ShuttingDown => "SHUTTING_DOWN",
            DaemonState::Backoff => "BACKOFF",
            DaemonState::Failed => "FAILED",
        }
    }

    /// A process exists (or is being started) for the daemon.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            DaemonState::Initializing
                | DaemonState::Running
                | DaemonState::Paused
                | DaemonState::ShuttingDown
        )
    }

    /// The supervisor means to keep this daemon running.
    pub fn is_wanted(self) -> bool {
        matches!(
            self,
            DaemonState::Waiting
                | DaemonState::Initializing
                | DaemonState::Running
                | DaemonState::Paused
                | DaemonState::Backoff
        )
    }

    /// Counts as "up" for dependents: RUNNING or PAUSED (a paused dependency is alive, only idle).
    pub fn satisfies_dependents(self) -> bool {
        matches!(self, DaemonState::Running | DaemonState::Paused)
    }

    /// No process, no plan to start one.
    pub fn is_at_rest(self) -> bool {
        matches!(self, DaemonState::Stopped | DaemonState::Failed)
    }
}

impl std::fmt::Display for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move [`transition`] refuses: "illegal transition RUNNING → WAITING".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition {from} → {to}")]
pub struct IllegalTransition {
    /// The state the daemon is in.
    pub from: DaemonState,
    /// The state the move asked for.
    pub to: DaemonState,
}

/// Checks one move. Every state change in the supervisor goes through here.
pub fn transition(from: DaemonState, to: DaemonState) -> Result<DaemonState, IllegalTransition> {
    use DaemonState::*;
    let legal = match (from, to) {
        // Starting: from rest (FAILED is cleared by an explicit start/restart).
        (Stopped | Failed, Waiting | Initializing) => true,
        (Waiting, Initializing) => true,
        // Worker reports.
        (Initializing, Running) => true,
        (Running, Paused) | (Paused, Running) => true,
        // Stopping is always possible from a live state.
        (Waiting | Initializing | Running | Paused | Backoff, ShuttingDown) => true,
        (ShuttingDown, Stopped) => true,
        // A cancelled start or a cancelled restart goes straight to rest.
        (Waiting | Backoff, Stopped) => true,
        // The process died unexpectedly.
        (Initializing | Running | Paused, Backoff | Failed | Stopped) => true,
        (Backoff, Initializing | Failed) => true,
        // A process that dies while being stopped.
        (ShuttingDown, Failed) => true,
        _ => false,
    };
    if legal || from == to {
        Ok(to)
    } else {
        Err(IllegalTransition { from, to })
    }
}

/// The state a worker's own report moves the daemon to, if the report is acceptable now.
///
/// Reports that contradict what the supervisor is doing (a worker saying RUNNING while it is
/// being stopped) are ignored rather than obeyed: the supervisor's intent wins.
pub fn apply_report(current: DaemonState, report: ReportedState) -> Option<DaemonState> {
    use DaemonState::*;
    let target = match report {
        ReportedState::Initializing => Initializing,
        ReportedState::Running => Running,
        ReportedState::Paused => Paused,
        ReportedState::ShuttingDown => ShuttingDown,
    };
    match (current, target) {
        (ShuttingDown, Running | Paused | Initializing) => None,
        (Running, Initializing) | (Paused, Initializing) => None,
        _ => transition(current, target).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::DaemonState::*;
    use super::*;

    const ALL: [DaemonState; 8] = [
        Stopped,
        Waiting,
        Initializing,
        Running,
        Paused,
        ShuttingDown,
        Backoff,
        Failed,
    ];

    #[test]
    fn the_documented_path_is_legal() {
        let path = [
            Stopped,
            Waiting,
            Initializing,
            Running,
            Paused,
            Running,
            ShuttingDown,
            Stopped,
        ];
        for pair in path.windows(2) {
            assert_eq!(transition(pair[0], pair[1]), Ok(pair[1]), "{:?}", pair);
        }
    }

    #[test]
    fn cannot_run_without_initializing() {
        assert!(transition(Stopped, Running).is_err());
        assert!(transition(Waiting, Running).is_err());
        assert!(transition(Backoff, Running).is_err());
    }

    #[test]
    fn cannot_pause_what_is_not_running() {
        for from in [
            Stopped,
            Waiting,
            Initializing,
            ShuttingDown,
            Backoff,
            Failed,
        ] {
            assert!(
                transition(from, Paused).is_err(),
                "{from} → PAUSED must be illegal"
            );
        }
    }

    #[test]
    fn every_live_state_can_be_shut_down() {
        for from in ALL.into_iter().filter(|s| s.is_wanted()) {
            assert!(transition(from, ShuttingDown).is_ok(), "{from}");
        }
    }

    #[test]
    fn failed_is_left_only_by_an_explicit_start() {
        for to in ALL {
            let ok = transition(Failed, to).is_ok();
            assert_eq!(
                ok,
                matches!(to, Waiting | Initializing | Failed),
                "FAILED → {to}"
            );
        }
    }

    #[test]
    fn stopped_is_reached_only_through_shutdown_or_cancel_or_death() {
        for from in ALL {
            let ok = transition(from, Stopped).is_ok();
            let expected = matches!(
                from,
                ShuttingDown | Waiting | Backoff | Initializing | Running | Paused | Stopped
            );
            assert_eq!(ok, expected, "{from} → STOPPED");
        }
    }

    #[test]
    fn crash_from_live_states_goes_to_backoff() {
        for from in [Initializing, Running, Paused] {
            assert!(transition(from, Backoff).is_ok());
        }
        assert!(transition(Stopped, Backoff).is_err());
    }

    #[test]
    fn reports_cannot_override_a_stop_in_progress() {
        assert_eq!(apply_report(ShuttingDown, ReportedState::Running), None);
        assert_eq!(apply_report(ShuttingDown, ReportedState::Paused), None);
        assert_eq!(
            apply_report(Initializing, ReportedState::Running),
            Some(Running)
        );
        assert_eq!(apply_report(Running, ReportedState::Paused), Some(Paused));
        assert_eq!(apply_report(Paused, ReportedState::Running), Some(Running));
        assert_eq!(
            apply_report(Running, ReportedState::ShuttingDown),
            Some(ShuttingDown)
        );
        assert_eq!(apply_report(Running, ReportedState::Initializing), None);
    }

    #[test]
    fn states_serialize_in_screaming_case() {
        assert_eq!(
            serde_json::to_string(&ShuttingDown).unwrap(),
            "\"SHUTTING_DOWN\""
        );
        for s in ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
