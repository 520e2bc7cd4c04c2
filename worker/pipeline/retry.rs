//! When a failing pipeline step may run again.
//!
//! A step that fails (an export job that exits 1, a games DB that cannot be read) is retried with
//! the supervisor's own restart rule, [`ringrift::restart::capped_backoff`]: the first retry after
//! [`RETRY_INITIAL`], doubling per consecutive failure up to [`RETRY_MAX`], plus up to 25 % jitter.
//! Every trigger (the periodic scan and events alike) honours the same schedule, so a burst of
//! NEW_GAMES_AVAILABLE no longer turns a broken step into a tight loop. A success clears it.
//!
//! Pure: the clock (`now`, unix seconds) and the jitter (in [0,1)) are arguments.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The wait after the first failure.
pub(crate) const RETRY_INITIAL: Duration = Duration::from_secs(2);
/// The longest wait between two attempts, jitter included.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(300);

/// A step that is failing: since when, how many attempts in a row, the last error, and the unix
/// time before which it is not tried again. Kept in the daemon's state file, so a restart does
/// not reset the schedule and other daemons can tell why no new data comes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Failing {
    pub since: f64,
    pub attempts: u32,
    pub error: String,
    pub retry_at: f64,
}

impl Failing {
    /// The schedule after another failure (`prev` is the one before it, if any).
    pub(crate) fn after(prev: Option<&Failing>, error: String, now: f64, jitter: f64) -> Failing {
        let attempts = prev.map_or(0, |p| p.attempts).saturating_add(1);
        let wait = ringrift::restart::capped_backoff(attempts, RETRY_INITIAL, RETRY_MAX, jitter);
        Failing {
            since: prev.map_or(now, |p| p.since),
            attempts,
            error,
            retry_at: now + wait.as_secs_f64(),
        }
    }

    /// Seconds until the next attempt is due; `None` once it is.
    pub(crate) fn wait(&self, now: f64) -> Option<f64> {
        (now < self.retry_at).then_some(self.retry_at - now)
    }

    /// For health: `retrying in 8 s after: <error> (3 attempts since <time>)`, or `retrying now`
    /// once the wait is over.
    pub(crate) fn describe(&self, now: f64) -> String {
        let when = match self.wait(now) {
            Some(w) => format!("retrying in {} s", w.ceil() as u64),
            None => "retrying now".to_string(),
        };
        format!(
            "{when} after: {} ({} failed attempt(s) since {})",
            self.error,
            self.attempts,
            utc(self.since)
        )
    }
}

/// Unix seconds as an RFC 3339 UTC time with milliseconds.
fn utc(secs: f64) -> String {
    let secs = secs.max(0.0);
    let mut out = Vec::with_capacity(24);
    ringrift::timefmt::format_utc_millis(
        secs.trunc() as u64,
        (secs.fract() * 1000.0) as u32,
        &mut out,
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_wait_longer_up_to_the_cap() {
        let mut f: Option<Failing> = None;
        let mut now = 1000.0;
        let mut waits = Vec::new();
        for i in 0..10 {
            let next = Failing::after(f.as_ref(), format!("boom {i}"), now, 0.0);
            waits.push(next.retry_at - now);
            now = next.retry_at;
            f = Some(next);
        }
        assert_eq!(
            waits,
            [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0]
        );
        let f = f.unwrap();
        assert_eq!(
            (f.since, f.attempts, f.error.as_str()),
            (1000.0, 10, "boom 9")
        );
        // 25 attempts would take far longer than 10 s: within 10 s there are at most 3.
        let mut f: Option<Failing> = None;
        let (mut now, mut attempts) = (0.0, 0);
        while now <= 10.0 {
            attempts += 1;
            let next = Failing::after(f.as_ref(), "x".into(), now, 0.999);
            now = next.retry_at;
            f = Some(next);
        }
        assert_eq!(attempts, 3);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter_and_health_says_when() {
        let f = Failing::after(None, "export job failed".into(), 100.0, 1.0);
        assert_eq!(f.retry_at, 102.5);
        assert_eq!(f.wait(101.0), Some(1.5));
        assert_eq!(f.wait(102.5), None);
        let text = f.describe(100.0);
        assert!(
            text.starts_with("retrying in 3 s after: export job failed (1 failed attempt(s) since 1970-01-01T00:01:40"),
            "{text}"
        );
        assert!(f.describe(200.0).starts_with("retrying now after:"));
        let j = ringrift::restart::jitter();
        assert!((0.0..1.0).contains(&j), "{j}");
    }
}
