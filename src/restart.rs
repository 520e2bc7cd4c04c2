//! Restart decisions: what to do when a daemon's process ends without anyone asking it to stop.
//!
//! Everything here is plain data and pure functions. No clock is read inside: the caller passes the
//! current instant (a monotonic [`Duration`] since an arbitrary epoch, e.g. supervisor start) and the
//! jitter value, so every decision can be replayed in a test.
//!
//! Two separate counters drive a decision:
//! - the *consecutive* count sets the backoff delay (capped exponential with jitter) and is reset
//!   once the daemon has stayed RUNNING for `stable_after`;
//! - the *intensity window* (restart instants within `restart_window`) caps how often a daemon may
//!   be restarted at all; exceeding it moves the daemon to FAILED until a user starts it again.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When a daemon whose process ended by itself is restarted (systemd's `Restart=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Whatever the exit (systemd `always`).
    #[default]
    Always,
    /// After a non-zero exit or a signal, not after exit 0 (systemd `on-failure`).
    OnFailure,
    /// Never: the daemon goes to STOPPED (systemd `no`).
    Never,
}

impl RestartPolicy {
    /// Accepts "always", "on_failure" (or "on-failure") and "never".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "always" => Some(RestartPolicy::Always),
            "on_failure" | "on-failure" => Some(RestartPolicy::OnFailure),
            "never" => Some(RestartPolicy::Never),
            _ => None,
        }
    }

    /// The policy as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on_failure",
            RestartPolicy::Never => "never",
        }
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A daemon's restart policy and budget (Erlang/OTP's intensity and period, s6's backoff).
#[derive(Debug, Clone, PartialEq)]
pub struct RestartSettings {
    /// When to restart.
    pub policy: RestartPolicy,
    /// Delay before the first restart: well under a second.
    pub backoff_initial: Duration,
    /// Upper bound of the delay, jitter included.
    pub backoff_max: Duration,
    /// Intensity limit: this many restarts within `restart_window` and the next death is FAILED.
    pub max_restarts: u32,
    /// The intensity window that `max_restarts` counts in.
    pub restart_window: Duration,
    /// RUNNING this long without dying resets the backoff (not the intensity window).
    pub stable_after: Duration,
}

impl Default for RestartSettings {
    fn default() -> Self {
        RestartSettings {
            policy: RestartPolicy::Always,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(60),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit code 0.
    Success,
    /// Non-zero exit code.
    Failure,
    /// Killed by a signal (watchdog kills included).
    Signaled,
}

/// The restarts of one daemon.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestartHistory {
    /// Instants of the restarts still inside the intensity window (oldest first).
    restarts: Vec<Duration>,
    /// Restarts since the daemon was last stable; drives the backoff.
    consecutive: u32,
}

impl RestartHistory {
    /// A history with no restart yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The daemon has been RUNNING continuously since `running_since`; once that has lasted
    /// `stable_after`, the backoff starts over. The intensity window is left alone.
    pub fn note_stable(&mut self, running_since: Duration, now: Duration, s: &RestartSettings) {
        if now.saturating_sub(running_since) >= s.stable_after {
            self.consecutive = 0;
        }
    }

    /// Restarts since the daemon was last stable: the exponent of the backoff.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Restart instants currently recorded (those inside the window at the last decision).
    pub fn recent(&self) -> &[Duration] {
        &self.restarts
    }

    /// An explicit start/restart by the user clears FAILED and forgets the history.
    pub fn clear(&mut self) {
        self.restarts.clear();
        self.consecutive = 0;
    }

    fn prune(&mut self, now: Duration, window: Duration) {
        self.restarts.retain(|&t| now.saturating_sub(t) <= window);
    }
}

/// What follows a process's end (see [`decide_after_exit`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ExitDecision {
    /// Restart after this delay (already recorded in the history).
    Restart {
        /// How long to wait before the new spawn (backoff with jitter).
        delay: Duration,
        /// Restarts since the daemon was last stable, this one included (1 for the first).
        attempt: u32,
    },
    /// Leave it stopped: the policy says so.
    Stop,
    /// Too many restarts in the window: give up.
    Fail {
        /// For `status` and the DAEMON_FAILED event: the restarts counted and the window.
        reason: String,
    },
}

/// Decides what follows an unrequested exit, and records the restart if there is one.
///
/// `exit_desc` is a human text of how it ended ("exit status 1", "killed by SIGKILL", ...);
/// `jitter` is a number in [0,1) supplied by the caller.
pub fn decide_after_exit(
    history: &mut RestartHistory,
    s: &RestartSettings,
    exit: ExitKind,
    exit_desc: &str,
    now: Duration,
    jitter: f64,
) -> ExitDecision {
    let wants_restart = match (s.policy, exit) {
        (RestartPolicy::Never, _) => false,
        (RestartPolicy::OnFailure, ExitKind::Success) => false,
        (RestartPolicy::OnFailure, ExitKind::Failure | ExitKind::Signaled) => true,
        (RestartPolicy::Always, _) => true,
    };
    if !wants_restart {
        return ExitDecision::Stop;
    }
    history.prune(now, s.restart_window);
    let recent = history.restarts.len();
    if recent >= s.max_restarts as usize {
        return ExitDecision::Fail {
            reason: format!(
                "restarted {recent} {} in {} (limit {}); last exit: {exit_desc}",
                if recent == 1 { "time" } else { "times" },
                fmt_secs(s.restart_window),
                s.max_restarts
            ),
        };
    }
    history.restarts.push(now);
    history.consecutive = history.consecutive.saturating_add(1);
    let attempt = history.consecutive;
    ExitDecision::Restart {
        delay: backoff_delay(attempt, s, jitter),
        attempt,
    }
}

/// Capped exponential backoff with jitter, for a daemon's restarts: [`capped_backoff`] with the
/// daemon's `backoff_initial` and `backoff_max`.
pub fn backoff_delay(attempt: u32, s: &RestartSettings, jitter: f64) -> Duration {
    capped_backoff(attempt, s.backoff_initial, s.backoff_max, jitter)
}

/// Capped exponential backoff with jitter: the one rule for every retry, daemon restarts and the
/// pipeline's failing steps alike.
///
/// Attempt 1 waits `initial`, each further attempt doubles it, up to `max`. Jitter (a number in
/// [0,1) from the caller, so schedules can be replayed) adds up to +25% on top of that base; the
/// cap applies after jitter, and the result is never below the un-jittered (capped) base. Attempt
/// 0 is treated as attempt 1.
pub fn capped_backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.max(1) - 1;
    let base = 2u32
        .checked_pow(exponent)
        .and_then(|factor| initial.checked_mul(factor))
        .unwrap_or(max)
        .min(max);
    let j = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let extra = base.mul_f64(0.25 * j);
    base.saturating_add(extra).min(max)
}

/// Whole seconds as "60s", fractions as "1.5s".
fn fmt_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// A seeded jitter source for [`backoff_delay`] / [`capped_backoff`]: the project's one PRNG
/// (`fastrand`, see docs/DECISIONS.md), so a seed replays the same schedule.
#[derive(Debug, Clone)]
pub struct Jitter(fastrand::Rng);

impl Jitter {
    /// A source whose values are fully determined by `seed` (any seed, zero included).
    pub fn new(seed: u64) -> Self {
        Jitter(fastrand::Rng::with_seed(seed))
    }

    /// The next value in [0,1).
    pub fn next_f64(&mut self) -> f64 {
        self.0.f64()
    }
}

/// A jitter value in [0,1) that differs between processes and calls, for callers that need no
/// replay (fastrand's thread-local generator, seeded afresh in every process).
pub fn jitter() -> f64 {
    fastrand::f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_backoff_doubles_from_initial_to_the_cap_with_bounded_jitter() {
        let (initial, max) = (secs(2), secs(300));
        let plain: Vec<Duration> = (1..=10)
            .map(|a| capped_backoff(a, initial, max, 0.0))
            .collect();
        assert_eq!(
            plain,
            [2, 4, 8, 16, 32, 64, 128, 256, 300, 300].map(secs).to_vec()
        );
        assert_eq!(capped_backoff(0, initial, max, 0.0), secs(2));
        assert_eq!(capped_backoff(u32::MAX, initial, max, 0.5), max);
        assert_eq!(
            capped_backoff(2, initial, max, 0.5),
            Duration::from_millis(4500)
        );
        assert_eq!(capped_backoff(2, initial, max, f64::NAN), secs(4));
        for a in 1..20 {
            for j in [0.0, 0.3, 0.999] {
                let d = capped_backoff(a, initial, max, j);
                let base = capped_backoff(a, initial, max, 0.0);
                assert!(d >= base && d <= max && d <= base.mul_f64(1.25), "{a} {j}");
            }
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn restart_delay(d: ExitDecision) -> Duration {
        match d {
            ExitDecision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn policy_parses_both_spellings() {
        assert_eq!(RestartPolicy::parse("always"), Some(RestartPolicy::Always));
        assert_eq!(
            RestartPolicy::parse("on_failure"),
            Some(RestartPolicy::OnFailure)
        );
        assert_eq!(
            RestartPolicy::parse("on-failure"),
            Some(RestartPolicy::OnFailure)
        );
        assert_eq!(RestartPolicy::parse("never"), Some(RestartPolicy::Never));
        assert_eq!(RestartPolicy::parse("sometimes"), None);
        assert_eq!(RestartPolicy::default(), RestartPolicy::Always);
        assert_eq!(
            serde_json::to_string(&RestartPolicy::OnFailure).unwrap(),
            "\"on_failure\""
        );
    }

    #[test]
    fn first_delay_is_under_a_second() {
        let s = RestartSettings::default();
        assert!(backoff_delay(1, &s, 0.0) < secs(1));
        assert!(backoff_delay(1, &s, 0.999) < secs(1));
        let mut h = RestartHistory::new();
        let d = decide_after_exit(&mut h, &s, ExitKind::Failure, "exit status 1", secs(0), 0.5);
        assert!(restart_delay(d) < secs(1));
    }

    #[test]
    fn delay_doubles_per_attempt() {
        let s = RestartSettings::default();
        for attempt in 1..8 {
            let a = backoff_delay(attempt, &s, 0.0);
            let b = backoff_delay(attempt + 1, &s, 0.0);
            assert_eq!(b, a * 2, "attempt {attempt}");
        }
        assert_eq!(backoff_delay(1, &s, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(4, &s, 0.0), Duration::from_millis(800));
    }

    #[test]
    fn cap_holds_for_large_attempts() {
        let s = RestartSettings::default();
        for attempt in [11, 12, 20, 31, 32, 33, 64, 1000, u32::MAX] {
            for j in [0.0, 0.5, 0.999_999] {
                assert_eq!(
                    backoff_delay(attempt, &s, j),
                    s.backoff_max,
                    "attempt {attempt}"
                );
            }
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let s = RestartSettings::default();
        let mut rng = Jitter::new(42);
        for attempt in 0..40 {
            let base = backoff_delay(attempt, &s, 0.0);
            for _ in 0..200 {
                let j = rng.next_f64();
                assert!((0.0..1.0).contains(&j));
                let d = backoff_delay(attempt, &s, j);
                assert!(d >= base, "attempt {attempt} jitter {j}: {d:?} < {base:?}");
                assert!(d <= s.backoff_max);
                assert!(d.as_secs_f64() <= base.as_secs_f64() * 1.25 + 1e-9);
            }
        }
        // Out-of-range jitter is clamped rather than trusted.
        assert_eq!(backoff_delay(1, &s, -3.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(1, &s, f64::NAN), Duration::from_millis(100));
        assert_eq!(backoff_delay(1, &s, 7.0), Duration::from_millis(125));
    }

    #[test]
    fn jitter_source_is_deterministic_and_in_range() {
        let mut a = Jitter::new(7);
        let mut b = Jitter::new(7);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
        let mut z = Jitter::new(0);
        assert!((0..10).map(|_| z.next_f64()).any(|x| x > 0.0));
    }

    #[test]
    fn sixth_restart_within_the_window_fails() {
        let s = RestartSettings::default();
        let mut h = RestartHistory::new();
        for i in 0..5u32 {
            let d = decide_after_exit(
                &mut h,
                &s,
                ExitKind::Failure,
                "exit status 1",
                secs(u64::from(i) * 2),
                0.0,
            );
            assert!(
                matches!(d, ExitDecision::Restart { attempt, .. } if attempt == i + 1),
                "{d:?}"
            );
        }
        let d = decide_after_exit(
            &mut h,
            &s,
            ExitKind::Failure,
            "exit status 1",
            secs(12),
            0.0,
        );
        match d {
            ExitDecision::Fail { reason } => {
                assert_eq!(
                    reason,
                    "restarted 5 times in 60s (limit 5); last exit: exit status 1"
                );
            }
            other => panic!("expected FAILED, got {other:?}"),
        }
        // A failure is not recorded as a restart.
        assert_eq!(h.recent().len(), 5);
        assert_eq!(h.consecutive(), 5);
    }

    #[test]
    fn restarts_spread_beyond_the_window_never_fail() {
        let s = RestartSettings::default();
        let mut h = RestartHistory::new();
        for i in 0..100u64 {
            let d = decide_after_exit(
                &mut h,
                &s,
                ExitKind::Signaled,
                "killed by SIGKILL",
                secs(i * 13),
                0.3,
            );
            assert!(
                matches!(d, ExitDecision::Restart { .. }),
                "restart {i}: {d:?}"
            );
            assert!(h.recent().len() <= 5);
        }
    }

    #[test]
    fn stability_resets_the_backoff_but_not_the_window() {
        let s = RestartSettings::default();
        let mut h = RestartHistory::new();
        for t in 0..3 {
            decide_after_exit(&mut h, &s, ExitKind::Failure, "exit status 1", secs(t), 0.0);
        }
        assert_eq!(h.consecutive(), 3);
        // Not stable long enough yet.
        h.note_stable(secs(3), secs(20), &s);
        assert_eq!(h.consecutive(), 3);
        h.note_stable(secs(3), secs(33), &s);
        assert_eq!(h.consecutive(), 0);
        assert_eq!(h.recent().len(), 3);
        let d = decide_after_exit(
            &mut h,
            &s,
            ExitKind::Failure,
            "exit status 1",
            secs(34),
            0.0,
        );
        assert_eq!(
            d,
            ExitDecision::Restart {
                delay: s.backoff_initial,
                attempt: 1
            }
        );
    }

    #[test]
    fn clear_forgets_everything() {
        let s = RestartSettings::default();
        let mut h = RestartHistory::new();
        for t in 0..5 {
            decide_after_exit(&mut h, &s, ExitKind::Failure, "exit status 1", secs(t), 0.0);
        }
        assert!(matches!(
            decide_after_exit(&mut h, &s, ExitKind::Failure, "exit status 1", secs(6), 0.0),
            ExitDecision::Fail { .. }
        ));
        h.clear();
        assert_eq!(h, RestartHistory::new());
        assert!(matches!(
            decide_after_exit(&mut h, &s, ExitKind::Failure, "exit status 1", secs(7), 0.0),
            ExitDecision::Restart { attempt: 1, .. }
        ));
    }

    #[test]
    fn policy_table() {
        use ExitKind::*;
        use RestartPolicy::*;
        let table = [
            (Always, Success, true),
            (Always, Failure, true),
            (Always, Signaled, true),
            (OnFailure, Success, false),
            (OnFailure, Failure, true),
            (OnFailure, Signaled, true),
            (Never, Success, false),
            (Never, Failure, false),
            (Never, Signaled, false),
        ];
        for (policy, exit, restarts) in table {
            let s = RestartSettings {
                policy,
                ..RestartSettings::default()
            };
            let mut h = RestartHistory::new();
            let d = decide_after_exit(&mut h, &s, exit, "x", secs(0), 0.0);
            if restarts {
                assert!(
                    matches!(d, ExitDecision::Restart { attempt: 1, .. }),
                    "{policy} {exit:?}: {d:?}"
                );
                assert_eq!(h.recent().len(), 1);
            } else {
                assert_eq!(d, ExitDecision::Stop, "{policy} {exit:?}");
                assert_eq!(h, RestartHistory::new(), "a stop records nothing");
            }
        }
    }
}
