//! The watchdog's judgement of a daemon, and how time the supervisor itself did not run is kept out
//! of it (issue 10, "watchdogs judge the daemon, not the supervisor's sleep").
//!
//! A daemon is silent when no heartbeat arrived for `heartbeat_timeout`, stalled when its progress
//! counters stayed flat for `stall_timeout`. Both windows start again at the supervisor's last
//! *resumption*: the heartbeats a daemon sent while the supervisor was stopped (SIGSTOP), frozen or
//! starved sit unread in its socket, so the silence the supervisor measures then is its own.
//!
//! [`LagDetector`] notices those gaps: a ticker reports every [`TICK`]; a tick that comes late by
//! more than [`TOLERANCE`], or a judgement made while the ticker is that late, marks a resumption.
//! Suspend of the whole machine is already left out, since `Instant` (CLOCK_MONOTONIC) does not
//! advance during it on Linux; the detector covers the rest.
//!
//! Every function takes the clock as an argument, so tests replay exact schedules.

use std::time::{Duration, Instant};

/// How often the supervisor's ticker reports that it runs.
pub const TICK: Duration = Duration::from_millis(100);

/// Lateness beyond which the supervisor counts as not having run.
pub const TOLERANCE: Duration = Duration::from_millis(900);

/// Remembers when the supervisor last ran without a gap.
#[derive(Debug, Clone, Default)]
pub struct LagDetector {
    last_tick: Option<Instant>,
    resumed_at: Option<Instant>,
    /// The most recent gap seen (the supervisor not running for this long), for the log.
    pub last_gap: Option<Duration>,
}

impl LagDetector {
    /// A detector whose ticker last ran at `now` (the supervisor's start), with no gap seen yet.
    pub fn new(now: Instant) -> LagDetector {
        LagDetector {
            last_tick: Some(now),
            ..LagDetector::default()
        }
    }

    /// A tick of the ticker at `now`; returns the gap when the supervisor had not run for too long.
    pub fn tick(&mut self, now: Instant) -> Option<Duration> {
        let gap = self.late_by(now);
        self.last_tick = Some(now);
        if let Some(g) = gap {
            self.resumed_at = Some(now);
            self.last_gap = Some(g);
        }
        gap
    }

    /// The instant windows restart from, asked at `now` by a judgement: the last resumption, or
    /// `now` when the ticker itself has not run for too long (the judgement came first after a gap).
    pub fn resumed_at(&mut self, now: Instant) -> Option<Instant> {
        if let Some(g) = self.late_by(now) {
            self.resumed_at = Some(now);
            self.last_gap = Some(g);
            // The ticker's next tick would report the same gap again.
            self.last_tick = Some(now);
        }
        self.resumed_at
    }

    fn late_by(&self, now: Instant) -> Option<Duration> {
        let last = self.last_tick?;
        let gap = now.saturating_duration_since(last);
        (gap > TICK + TOLERANCE).then_some(gap)
    }
}

/// What the watchdog concludes about one daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine; look again after this long.
    Healthy {
        /// Time until the nearer window would run out if nothing arrives: the heartbeat timeout
        /// or the stall timeout, minus what has already passed of it.
        next_check: Duration,
    },
    /// No heartbeat for this long (counted from the later of the last heartbeat and the resumption).
    Silent(Duration),
    /// Progress flat for this long while heartbeating.
    Stalled(Duration),
}

/// The windows a daemon is judged by.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// No heartbeat for this long → [`Verdict::Silent`] (the daemon's `heartbeat_timeout`).
    pub heartbeat_timeout: Duration,
    /// None: stalls are not watched (or the daemon is paused).
    pub stall_timeout: Option<Duration>,
}

/// Judges a daemon at `now`. Time before `resumed_at` never counts against it.
pub fn judge(
    now: Instant,
    last_heartbeat: Instant,
    last_progress_change: Instant,
    resumed_at: Option<Instant>,
    w: Windows,
) -> Verdict {
    let since = |t: Instant| {
        let from = resumed_at.map_or(t, |r| r.max(t));
        now.saturating_duration_since(from)
    };
    let silent = since(last_heartbeat);
    if silent >= w.heartbeat_timeout {
        return Verdict::Silent(silent);
    }
    let mut next = w.heartbeat_timeout - silent;
    if let Some(stall) = w.stall_timeout {
        let flat = since(last_progress_change);
        if flat >= stall {
            return Verdict::Stalled(flat);
        }
        next = next.min(stall - flat);
    }
    Verdict::Healthy { next_check: next }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const W: Windows = Windows {
        heartbeat_timeout: Duration::from_secs(3),
        stall_timeout: Some(Duration::from_secs(10)),
    };

    #[test]
    fn silence_and_stalls_are_judged_from_the_last_sign_of_life() {
        let t0 = Instant::now();
        assert_eq!(
            judge(t0 + S, t0, t0, None, W),
            Verdict::Healthy { next_check: 2 * S }
        );
        assert_eq!(judge(t0 + 3 * S, t0, t0, None, W), Verdict::Silent(3 * S));
        assert_eq!(
            judge(t0 + 11 * S, t0 + 10 * S, t0, None, W),
            Verdict::Stalled(11 * S)
        );
    }

    #[test]
    fn time_before_a_resumption_does_not_count() {
        let t0 = Instant::now();
        // Last heartbeat at t0, the supervisor frozen until t0+40s, judged at t0+40.5s.
        let resumed = t0 + 40 * S;
        let v = judge(resumed + S / 2, t0, t0, Some(resumed), W);
        assert_eq!(
            v,
            Verdict::Healthy {
                next_check: 3 * S - S / 2
            }
        );
        // A daemon that stays silent after the resumption is still caught.
        assert_eq!(
            judge(resumed + 3 * S, t0, t0, Some(resumed), W),
            Verdict::Silent(3 * S)
        );
    }

    #[test]
    fn the_detector_notices_a_late_tick() {
        let t0 = Instant::now();
        let mut d = LagDetector::new(t0);
        assert_eq!(d.tick(t0 + TICK), None);
        assert_eq!(d.resumed_at(t0 + TICK * 2), None);
        let after = t0 + 40 * S;
        assert_eq!(d.tick(after), Some(after - (t0 + TICK)));
        assert_eq!(d.resumed_at(after + TICK), Some(after));
    }

    #[test]
    fn a_judgement_before_the_first_late_tick_counts_as_the_resumption() {
        let t0 = Instant::now();
        let mut d = LagDetector::new(t0);
        let after = t0 + 40 * S;
        assert_eq!(d.resumed_at(after), Some(after));
        // The ticker that runs next does not report the same gap again.
        assert_eq!(d.tick(after + TICK), None);
        assert_eq!(d.resumed_at(after + 2 * TICK), Some(after));
    }
}
