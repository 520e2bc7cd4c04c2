//! The typed settings of each built-in daemon: one struct per daemon, read by one function that
//! both `config check` (through [`crate::config`], which turns each complaint into a `Problem` with
//! file, line and key) and the worker (from the settings in its welcome) call, so a value the
//! check accepts is exactly the value the worker uses and nothing falls back to a default in silence.
//!
//! Durations are seconds as a number, or a string: a bare number (`"90"`), or what the `humantime`
//! crate reads (`"500ms"`, `"10s"`, `"5m"`, `"1m30s"`, `"2h"`, `"1day"`).

use std::time::Duration;

use serde_json::{Map, Value};

/// A value that is not a duration (see [`parse_duration`]): says what was found and, for a string
/// humantime could not read, why.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationError {
    /// The value as written (see [`crate::config::show_value`]).
    pub found: String,
    /// humantime's reason, for a string that is neither a number nor a humantime duration.
    pub humantime: Option<humantime::DurationError>,
    /// It reads as a duration below zero (`-1`, `"-2s"`).
    pub negative: bool,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.negative {
            return write!(f, "must not be negative; found {}", self.found);
        }
        write!(
            f,
            "must be a duration: seconds, or a string such as \"500ms\", \"10s\", \"5m\", \"1m30s\"; found {}",
            self.found
        )?;
        match &self.humantime {
            Some(e) => write!(f, ": {e}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for DurationError {}

/// Parses a duration value (see the module doc). The error says what was found.
pub fn parse_duration(v: &Value) -> Result<Duration, DurationError> {
    let bad = || DurationError {
        found: crate::config::show_value(v),
        humantime: None,
        negative: false,
    };
    let negative = || DurationError {
        negative: true,
        ..bad()
    };
    let secs = match v {
        Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        Value::String(s) => {
            let s = s.trim();
            if s.starts_with('-') {
                return Err(negative());
            }
            match s.parse::<f64>() {
                Ok(n) => n,
                Err(_) => {
                    return humantime::parse_duration(s).map_err(|e| DurationError {
                        humantime: Some(e),
                        ..bad()
                    });
                }
            }
        }
        _ => return Err(bad()),
    };
    if secs < 0.0 {
        return Err(negative());
    }
    if !secs.is_finite() {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Reads typed values out of one daemon's settings map, noting every problem as (key, message)
/// and giving the default for a missing key.
pub struct Reader<'a> {
    map: &'a Map<String, Value>,
    /// (key, message) for each value that is not what its setting needs.
    pub problems: Vec<(String, String)>,
}

impl<'a> Reader<'a> {
    /// A reader of one daemon's settings map, with no problem noted yet.
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Reader {
            map,
            problems: Vec::new(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn complain(&mut self, key: &str, message: String) {
        self.problems.push((key.to_string(), message));
    }

    /// A duration between `min` and `max` (inclusive).
    pub fn duration(
        &mut self,
        key: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(v) = self.get(key) else {
            return default;
        };
        match parse_duration(v) {
            Ok(d) if d >= min && d <= max => d,
            Ok(d) => {
                self.complain(
                    key,
                    format!(
                        "{} is out of range ({} ..= {})",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Err(e) => {
                self.complain(key, e.to_string());
                default
            }
        }
    }

    /// A whole number between `min` and `max` (inclusive).
    pub fn count(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => n,
            _ => {
                self.complain(
                    key,
                    format!(
                        "must be a whole number from {min} to {max}, found {}",
                        crate::config::show_value(v)
                    ),
                );
                default
            }
        }
    }

    /// A number between `min` and `max` (inclusive); `unit` follows the bounds in the message.
    pub fn number(&mut self, key: &str, default: f64, min: f64, max: f64, unit: &str) -> f64 {
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_f64() {
            Some(n) if n >= min && n <= max => n,
            _ => {
                self.complain(
                    key,
                    format!(
                        "must be a number from {min} to {max}{unit}, found {}",
                        crate::config::show_value(v)
                    ),
                );
                default
            }
        }
    }

    /// A fraction from 0 to 1 (a win rate: 0.75, not 75).
    pub fn fraction(&mut self, key: &str, default: f64) -> f64 {
        self.number(key, default, 0.0, 1.0, " (a fraction: 0.75 means 75 %)")
    }

    /// A true/false setting; `default` when absent; anything else is a problem.
    pub fn boolean(&mut self, key: &str, default: bool) -> bool {
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_bool() {
            Some(b) => b,
            None => {
                self.complain(
                    key,
                    format!(
                        "must be true or false, found {}",
                        crate::config::show_value(v)
                    ),
                );
                default
            }
        }
    }

    /// A sequential test's parameters: a mapping `{elo0, elo1, alpha, beta}` (a field left out
    /// keeps `default`'s), or `false` for none; `default` when absent.
    pub fn sprt(&mut self, key: &str, default: crate::sprt::Sprt) -> Option<crate::sprt::Sprt> {
        let Some(v) = self.get(key) else {
            return Some(default);
        };
        let fields = match v {
            Value::Bool(false) => return None,
            Value::Object(m) => m,
            other => {
                let found = crate::config::show_value(other);
                self.complain(
                    key,
                    format!(
                        "must be a mapping {{elo0, elo1, alpha, beta}} or false, found {found}"
                    ),
                );
                return Some(default);
            }
        };
        let mut n = [default.elo0, default.elo1, default.alpha, default.beta];
        for (field, value) in fields {
            let slot = match field.as_str() {
                "elo0" => 0,
                "elo1" => 1,
                "alpha" => 2,
                "beta" => 3,
                other => {
                    self.complain(
                        key,
                        format!("unknown field '{other}' (fields: elo0, elo1, alpha, beta)"),
                    );
                    continue;
                }
            };
            match value.as_f64() {
                Some(x) => n[slot] = x,
                None => self.complain(
                    key,
                    format!(
                        "{field} must be a number, found {}",
                        crate::config::show_value(value)
                    ),
                ),
            }
        }
        match crate::sprt::Sprt::new(n[0], n[1], n[2], n[3]) {
            Ok(t) => Some(t),
            Err(e) => {
                self.complain(key, e);
                Some(default)
            }
        }
    }

    /// A list of strings (empty when missing).
    pub fn strings(&mut self, key: &str) -> Vec<String> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        match v.as_array().and_then(|a| {
            a.iter()
                .map(|w| w.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        }) {
            Some(list) => list,
            None => {
                self.complain(
                    key,
                    format!(
                        "must be a list of strings, found {}",
                        crate::config::show_value(v)
                    ),
                );
                Vec::new()
            }
        }
    }
}

/// The settings errors of a whole daemon, for the worker: `key: message; key: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid settings: {}", .0.iter().map(|(k, m)| format!("{k}: {m}")).collect::<Vec<_>>().join("; "))]
pub struct SettingsError(pub Vec<(String, String)>);

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
const DAY: Duration = secs(86_400);
const WEEK: Duration = secs(7 * 86_400);

/// Declares a daemon's settings struct and the function that reads it.
macro_rules! daemon_settings {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty = $read:expr),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }
        impl $name {
            /// Reads the settings, noting problems in `r`.
            pub fn read(r: &mut Reader<'_>) -> Self {
                $name { $($field: ($read)(r, stringify!($field)),)* }
            }
            /// Reads the settings from a map, or every problem found.
            pub fn from_map(map: &Map<String, Value>) -> Result<Self, SettingsError> {
                let mut r = Reader::new(map);
                let s = Self::read(&mut r);
                if r.problems.is_empty() { Ok(s) } else { Err(SettingsError(r.problems)) }
            }
        }
    };
}

daemon_settings!(
    /// auto_sync and ephemeral_sync: push snapshots of the games DBs to `targets`.
    SyncSettings {
        /// Directories or `host:path`.
        targets: Vec<String> = |r: &mut Reader, k| r.strings(k),
        /// Delivery attempts per target before DATA_SYNC_FAILED.
        retries: u32 = |r: &mut Reader, k| r.count(k, 3, 1, 100) as u32,
        /// Before the first retry; doubles per attempt.
        retry_backoff: Duration = |r: &mut Reader, k| r.duration(k, secs(5), Duration::ZERO, secs(3600)),
        /// How long one rsync/ssh may run.
        timeout: Duration = |r: &mut Reader, k| r.duration(k, secs(300), secs(1), DAY),
    }
);

daemon_settings!(
    /// cluster_data_sync: merge the games other nodes pushed from `peers`.
    ClusterSyncSettings {
        /// Directories or `host:path` of the other nodes' games DBs.
        peers: Vec<String> = |r: &mut Reader, k| r.strings(k),
        /// How long one rsync/ssh may run.
        timeout: Duration = |r: &mut Reader, k| r.duration(k, secs(300), secs(1), DAY),
    }
);

daemon_settings!(
    /// model_distribution: copy canonical models to `targets`.
    DistributionSettings {
        /// Directories or `host:path` that receive the canonical models.
        targets: Vec<String> = |r: &mut Reader, k| r.strings(k),
        /// Delivery attempts per target before a failure is reported.
        retries: u32 = |r: &mut Reader, k| r.count(k, 3, 1, 100) as u32,
        /// Before the first retry; doubles per attempt.
        retry_backoff: Duration = |r: &mut Reader, k| r.duration(k, secs(5), Duration::ZERO, secs(3600)),
        /// How long one rsync/ssh may run.
        timeout: Duration = |r: &mut Reader, k| r.duration(k, secs(300), secs(1), DAY),
    }
);

daemon_settings!(
    /// auto_export: when to export the new games of a config key.
    ExportSettings {
        /// New completed games that trigger an export.
        threshold_games: u64 = |r: &mut Reader, k| r.count(k, 1000, 1, 1 << 40),
        /// Or this long after the first of fewer new games.
        batch_timeout: Duration = |r: &mut Reader, k| r.duration(k, secs(600), Duration::ZERO, WEEK),
        /// The replay window: the training file holds the samples of at most this many of the
        /// newest games of a key (Lc0 and KataGo train on a window of recent games, not on all
        /// of history). Filled into the export job as `{replay_window}`.
        replay_window: u64 = |r: &mut Reader, k| r.count(k, 20_000, 1, 1 << 40),
        /// Completed games kept per key in the games DB, newest first; older ones already
        /// exported are deleted after an export (0 = keep every game). At least `replay_window`.
        games_keep: u64 = |r: &mut Reader, k| r.count(k, 100_000, 0, 1 << 40),
    }
);

daemon_settings!(
    /// training_trigger: when and how to train.
    TrainingSettings {
        /// Accepted for compatibility with the seed's configuration; export decides on games.
        threshold_games: u64 = |r: &mut Reader, k| r.count(k, 1000, 1, 1 << 40),
        /// An export with fewer training samples is not trained on.
        min_samples: u64 = |r: &mut Reader, k| r.count(k, 1000, 0, 1 << 40),
        /// Between two training runs of a config key.
        cooldown: Duration = |r: &mut Reader, k| r.duration(k, secs(300), Duration::ZERO, WEEK),
        /// Passes over the exported samples per training run.
        epochs: u64 = |r: &mut Reader, k| r.count(k, 10, 1, 100_000),
        /// SGD step size of the reference trainer (0 to 10).
        learning_rate: f64 = |r: &mut Reader, k| r.number(k, 0.01, 0.0, 10.0, ""),
        /// After a failed run; doubles per consecutive failure.
        failure_backoff: Duration = |r: &mut Reader, k| r.duration(k, secs(60), Duration::ZERO, DAY),
    }
);

daemon_settings!(
    /// evaluation: the gauntlet's size and the backpressure limit.
    EvaluationSettings {
        /// Games against each opponent (against the canonical model, at most this many when
        /// `sprt` is on).
        games: u64 = |r: &mut Reader, k| r.count(k, 1000, 1, 1_000_000),
        /// The sequential test against the canonical model (`crate::sprt`): elo0 0, elo1 50,
        /// alpha and beta 0.05 by default; `false` plays a fixed match of `games` games.
        sprt: Option<crate::sprt::Sprt> =
            |r: &mut Reader, k| r.sprt(k, crate::sprt::Sprt::DEFAULT),
        /// Candidates waiting beyond this → BACKPRESSURE_ACTIVATED.
        queue_limit: u64 = |r: &mut Reader, k| r.count(k, 4, 0, 1_000_000),
    }
);

daemon_settings!(
    /// auto_promotion: the gates a candidate must pass.
    PromotionSettings {
        /// Fraction of games a candidate must win against random play.
        min_win_rate_vs_random: f64 = |r: &mut Reader, k| r.fraction(k, 0.6),
        /// Fraction of games it must win against the current canonical model (when there is one).
        min_win_rate_vs_baseline: f64 = |r: &mut Reader, k| r.fraction(k, 0.55),
        /// Evaluation games it must have played.
        min_games: u64 = |r: &mut Reader, k| r.count(k, 100, 0, 1_000_000),
        /// Between two promotions of a config key.
        cooldown: Duration = |r: &mut Reader, k| r.duration(k, Duration::ZERO, Duration::ZERO, WEEK),
        /// The most a candidate's rating on the key's ladder (Elo, fitted over every recorded
        /// game) may fall below the canonical model's: a candidate that wins head to head but
        /// loses to the fixed reference opponents is a regression (gate `rating`).
        max_elo_drop: f64 = |r: &mut Reader, k| r.number(k, 50.0, 0.0, 100_000.0, " Elo"),
        /// Decided candidates (promoted or rejected) kept per key, newest first, with their
        /// results; older ones are deleted (0 = keep every one).
        keep_candidates: u64 = |r: &mut Reader, k| r.count(k, 20, 0, 1_000_000),
        /// Replaced canonical models kept per key in models/backup/, newest first (0 = keep
        /// every one).
        keep_backups: u64 = |r: &mut Reader, k| r.count(k, 10, 0, 1_000_000),
        /// Every this many generations the new canonical model is pinned (copied to
        /// models/reference/<key>/) as a fixed reference opponent of later gauntlets; the first
        /// generation always is. 0 = never.
        pin_every: u64 = |r: &mut Reader, k| r.count(k, 5, 0, 1_000_000),
        /// Pinned generations kept per key, newest first.
        pinned_keep: u64 = |r: &mut Reader, k| r.count(k, 4, 1, 1000),
    }
);

daemon_settings!(
    /// unified_node_health: the thresholds of a healthy node.
    NodeHealthSettings {
        /// Free disk under the root below this (GB, 10^9 bytes) is unhealthy.
        min_free_disk_gb: f64 = |r: &mut Reader, k| r.number(k, 5.0, 0.0, 1e9, " GB"),
        /// MemAvailable below this (MB, 10^6 bytes) is unhealthy.
        min_available_memory_mb: f64 = |r: &mut Reader, k| r.number(k, 512.0, 0.0, 1e12, " MB"),
        /// The 1-minute load average per core above this is unhealthy.
        max_load_per_core: f64 = |r: &mut Reader, k| r.number(k, 4.0, 0.0, 1e6, ""),
        /// The ceiling of what the loop keeps under the root (GB, 10^9 bytes: games, training
        /// files, models, logs, events): above it the node is unhealthy. 0 = no ceiling.
        max_root_gb: f64 = |r: &mut Reader, k| r.number(k, 500.0, 0.0, 1e9, " GB"),
    }
);

daemon_settings!(
    /// quality_monitor: how games are scored.
    QualitySettings {
        /// The newest games of a config key that are scored.
        window_games: u64 = |r: &mut Reader, k| r.count(k, 200, 1, 1_000_000),
        /// Under this score → LOW_QUALITY_DATA_WARNING.
        threshold: f64 = |r: &mut Reader, k| r.fraction(k, 0.5),
        /// A game shorter than this (moves) counts as degenerate.
        min_moves: u64 = |r: &mut Reader, k| r.count(k, 5, 0, 1_000_000),
        /// A game longer than this (moves) counts as degenerate.
        max_moves: u64 = |r: &mut Reader, k| r.count(k, 500, 1, 1_000_000),
    }
);

daemon_settings!(
    /// idle_resource: extra selfplay on an idle node.
    IdleSettings {
        /// Percent of CPU (and GPU) below which the node counts as idle.
        cpu_threshold: f64 = |r: &mut Reader, k| r.number(k, 50.0, 0.0, 100.0, " percent"),
        /// Idle this long before extra selfplay starts.
        idle_window: Duration = |r: &mut Reader, k| r.duration(k, secs(120), Duration::ZERO, WEEK),
        /// Extra selfplay jobs at once on an idle node.
        max_extra_jobs: u64 = |r: &mut Reader, k| r.count(k, 1, 0, 1000),
        /// Games each extra selfplay job plays.
        games_per_job: u64 = |r: &mut Reader, k| r.count(k, 50, 1, 1_000_000),
    }
);

daemon_settings!(
    /// unified_idle_shutdown: when to run `shutdown_command`.
    IdleShutdownSettings {
        /// Empty: never shuts down.
        shutdown_command: Vec<String> = |r: &mut Reader, k| r.strings(k),
        /// Idle this many minutes (CPU under `cpu_threshold`, no jobs) before the command runs.
        idle_minutes: f64 = |r: &mut Reader, k| r.number(k, 30.0, 0.0, 1e6, " minutes"),
        /// Percent of CPU below which the node counts as idle.
        cpu_threshold: f64 = |r: &mut Reader, k| r.number(k, 10.0, 0.0, 100.0, " percent"),
        /// In a cluster: nodes that must remain; a node leaves only if at least this many others
        /// stay (default 1).
        min_nodes: u64 = |r: &mut Reader, k| r.count(k, 1, 0, 100_000),
    }
);

daemon_settings!(
    /// queue_populator: how many selfplay items to keep queued.
    QueueSettings {
        /// Selfplay items to keep pending in the work queue.
        target_depth: u64 = |r: &mut Reader, k| r.count(k, 20, 0, 1_000_000),
        /// Games per queued selfplay item.
        games_per_item: u64 = |r: &mut Reader, k| r.count(k, 50, 1, 1_000_000),
    }
);

daemon_settings!(
    /// selfplay_scheduler: slots and the weights of config keys.
    SchedulerSettings {
        /// Selfplay jobs this node runs at once.
        slots: u64 = |r: &mut Reader, k| r.count(k, 1, 1, 1024),
        /// Completed games per config key the scheduler aims for; keys further from it weigh more.
        target_games: f64 = |r: &mut Reader, k| r.number(k, 5000.0, 1.0, 1e12, " games"),
        /// A canonical model this many hours old counts as fully stale (no model: most stale); staler keys weigh more.
        staleness_hours: f64 = |r: &mut Reader, k| r.number(k, 24.0, 0.0, 1e6, " hours"),
        /// A failed item waits this long before it is claimed again, doubled per failure; after
        /// its third failure it is set aside (WORK_FAILED).
        retry_backoff: Duration = |r: &mut Reader, k| r.duration(k, secs(30), Duration::ZERO, secs(86_400)),
    }
);

daemon_settings!(
    /// job_reaper: when a job is stuck and how it is stopped.
    ReaperSettings {
        /// A job with no CPU time and no output for this long is stuck.
        stuck_after: Duration = |r: &mut Reader, k| r.duration(k, secs(600), secs(1), WEEK),
        /// Between SIGTERM and SIGKILL when a stuck job is stopped.
        reap_grace: Duration = |r: &mut Reader, k| r.duration(k, secs(5), Duration::ZERO, secs(3600)),
        /// Only report what would be reaped.
        dry_run: bool = |r: &mut Reader, k| r.boolean(k, false),
    }
);

/// Checks the settings of the built-in daemon `name` (a catalog name), noting every problem in
/// `r`; cross-field rules too. Names without settings of their own note nothing.
pub fn check(name: &str, r: &mut Reader<'_>) {
    match name {
        "auto_sync" | "ephemeral_sync" => drop(SyncSettings::read(r)),
        "cluster_data_sync" => drop(ClusterSyncSettings::read(r)),
        "model_distribution" => drop(DistributionSettings::read(r)),
        "auto_export" => {
            let e = ExportSettings::read(r);
            if e.games_keep != 0 && e.games_keep < e.replay_window {
                r.complain(
                    "games_keep",
                    format!(
                        "must be 0 (keep every game) or at least replay_window ({}): the window is rebuilt from the games DB when the training file is lost",
                        e.replay_window
                    ),
                );
            }
        }
        "training_trigger" => drop(TrainingSettings::read(r)),
        "evaluation" => drop(EvaluationSettings::read(r)),
        "auto_promotion" => drop(PromotionSettings::read(r)),
        "unified_node_health" => drop(NodeHealthSettings::read(r)),
        "quality_monitor" => {
            let q = QualitySettings::read(r);
            if q.min_moves > q.max_moves {
                r.complain(
                    "min_moves",
                    format!("must not exceed max_moves ({})", q.max_moves),
                );
            }
        }
        "idle_resource" => drop(IdleSettings::read(r)),
        "unified_idle_shutdown" => drop(IdleShutdownSettings::read(r)),
        "queue_populator" => drop(QueueSettings::read(r)),
        "selfplay_scheduler" => drop(SchedulerSettings::read(r)),
        "job_reaper" => drop(ReaperSettings::read(r)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn durations_take_seconds_and_humantime_strings() {
        let d = |v: Value| parse_duration(&v);
        assert_eq!(d(json!(1.5)), Ok(Duration::from_millis(1500)));
        assert_eq!(d(json!("90")), Ok(secs(90)));
        assert_eq!(d(json!("500ms")), Ok(Duration::from_millis(500)));
        assert_eq!(d(json!("5m")), Ok(secs(300)));
        assert_eq!(d(json!("1m30s")), Ok(secs(90)));
        assert_eq!(d(json!("2h")), Ok(secs(7200)));
        let e = d(json!("soon")).unwrap_err().to_string();
        assert!(
            e.starts_with("must be a duration: ") && e.contains("'soon': "),
            "{e}"
        );
        assert!(d(json!(-3)).is_err());
        assert!(d(json!(true)).is_err());
    }

    #[test]
    fn the_worker_gets_what_was_written() {
        let t =
            TrainingSettings::from_map(&map(json!({"cooldown": "5m", "min_samples": 20}))).unwrap();
        assert_eq!(t.cooldown, secs(300));
        assert_eq!(t.min_samples, 20);
        assert_eq!(t.epochs, 10, "a missing key takes its default");
    }

    #[test]
    fn the_sequential_test_is_a_mapping_over_the_default_or_false() {
        use crate::sprt::Sprt;
        let read = |v: Value| EvaluationSettings::from_map(&map(json!({ "sprt": v })));
        assert_eq!(
            EvaluationSettings::from_map(&map(json!({}))).unwrap().sprt,
            Some(Sprt::DEFAULT)
        );
        assert_eq!(read(json!(false)).unwrap().sprt, None);
        let t = read(json!({"elo1": 30, "alpha": 0.01}))
            .unwrap()
            .sprt
            .unwrap();
        assert_eq!((t.elo0, t.elo1, t.alpha, t.beta), (0.0, 30.0, 0.01, 0.05));
        for (bad, says) in [
            (json!({"elo1": -5}), "elo0 (0) must be less than elo1 (-5)"),
            (json!({"alpha": 0.7}), "alpha (0.7) must be in (0, 0.5)"),
            (json!({"elo2": 1}), "unknown field 'elo2'"),
            (json!({"beta": "x"}), "beta must be a number"),
            (
                json!(true),
                "must be a mapping {elo0, elo1, alpha, beta} or false",
            ),
        ] {
            let e = read(bad.clone()).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn wrong_types_and_ranges_are_named_never_defaulted() {
        let e =
            TrainingSettings::from_map(&map(json!({"min_samples": "lots", "cooldown": "soon"})))
                .unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["min_samples", "cooldown"]);
        let e =
            PromotionSettings::from_map(&map(json!({"min_win_rate_vs_random": 75}))).unwrap_err();
        assert!(
            e.to_string()
                .contains("min_win_rate_vs_random: must be a number from 0 to 1"),
            "{e}"
        );
        let e = ExportSettings::from_map(&map(json!({"threshold_games": -3}))).unwrap_err();
        assert!(
            e.to_string()
                .contains("threshold_games: must be a whole number"),
            "{e}"
        );
    }

    #[test]
    fn cross_field_rules_are_checked() {
        let m = map(json!({"min_moves": 50, "max_moves": 10}));
        let mut r = Reader::new(&m);
        check("quality_monitor", &mut r);
        assert_eq!(r.problems[0].0, "min_moves");
        let m = map(json!({"replay_window": 500, "games_keep": 100}));
        let mut r = Reader::new(&m);
        check("auto_export", &mut r);
        assert_eq!(r.problems[0].0, "games_keep");
        let m = map(json!({"replay_window": 500, "games_keep": 0}));
        let mut r = Reader::new(&m);
        check("auto_export", &mut r);
        assert!(r.problems.is_empty());
    }
}
