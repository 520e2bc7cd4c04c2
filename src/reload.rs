//! What a reload does to a daemon that is in both the old and the new configuration.
//!
//! Keys fall into two kinds (issue 10, "reload at the right depth"):
//!
//! - **policy** keys say how the supervisor treats the process (restart policy and budget, backoff,
//!   grace period, watchdog windows, readiness, dependencies). They apply to the running process in
//!   place: the next decision uses the new value, and the process keeps its pid.
//! - **process** keys change what runs (`command`, `protocol`, `env`, the interval and heartbeat
//!   interval the worker was welcomed with, its `settings`, and every other key handed to the worker).
//!   Changing one restarts the process.
//!
//! The job command templates (`pipeline.jobs`) are not the daemon's own: changing them restarts no
//! daemon. A worker reads them from its welcome, so a running worker keeps the templates it started
//! with until its next restart (docs/DECISIONS.md).

use serde_json::Value;

use std::collections::BTreeMap;

use crate::config::DaemonConfig;
use crate::lifecycle::DaemonState;

/// Keys of a daemon entry that apply to a running process without restarting it.
pub const POLICY_KEYS: &[&str] = &[
    "enabled",
    "depends_on",
    "restart",
    "backoff_initial",
    "backoff_max",
    "max_restarts",
    "restart_window",
    "stable_after",
    "grace_period",
    "heartbeat_timeout",
    "stall_timeout",
    "ready_timeout",
    "ready",
];

/// What a reload does to one daemon present before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadAction {
    /// Nothing the daemon sees changed.
    Unchanged,
    /// Only policy keys (listed) changed: the running process keeps going under the new values.
    InPlace(Vec<String>),
    /// A process key (listed, with any policy keys that changed too) changed: restart it.
    Restart(Vec<String>),
    /// Only the job templates changed: no restart; a worker picks them up at its next start.
    JobTemplates,
}

/// Compares two configurations of the same daemon, key by key.
///
/// `enabled` is reported as a policy key; the caller decides what enabling or disabling means.
pub fn classify(old: &DaemonConfig, new: &DaemonConfig) -> ReloadAction {
    let (old_keys, old_jobs) = split(&old.settings);
    let (new_keys, new_jobs) = split(&new.settings);
    let mut policy = Vec::new();
    let mut process = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        old_keys.keys().chain(new_keys.keys()).collect();
    for key in names {
        if old_keys.get(key) == new_keys.get(key) {
            continue;
        }
        if POLICY_KEYS.contains(&key.as_str()) {
            policy.push(key.clone());
        } else {
            process.push(key.clone());
        }
    }
    // The typed fields are what the supervisor acts on; they are derived from the keys above, but an
    // environment override or a default can change them without a key in the entry.
    let typed_process = old.command != new.command
        || old.protocol != new.protocol
        || old.env != new.env
        || old.interval != new.interval
        || old.heartbeat_interval != new.heartbeat_interval;
    if typed_process && process.is_empty() {
        process.push("settings".into());
    }
    let typed_policy = old.enabled != new.enabled
        || old.depends_on != new.depends_on
        || old.restart != new.restart
        || old.grace_period != new.grace_period
        || old.heartbeat_timeout != new.heartbeat_timeout
        || old.stall_timeout != new.stall_timeout
        || old.ready_timeout != new.ready_timeout
        || old.ready != new.ready;
    if typed_policy && policy.is_empty() {
        policy.push("policy".into());
    }
    if !process.is_empty() {
        process.extend(policy);
        ReloadAction::Restart(process)
    } else if !policy.is_empty() {
        ReloadAction::InPlace(policy)
    } else if old_jobs != new_jobs {
        ReloadAction::JobTemplates
    } else {
        ReloadAction::Unchanged
    }
}

/// What a reload does to one daemon, as the supervisor carries it out and reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Gone from the configuration: stopped, and forgotten once at rest.
    Removed,
    /// New in the configuration; `start` when it is enabled.
    Added {
        /// It is enabled: start it.
        start: bool,
    },
    /// Was enabled, is not: stopped.
    Disabled,
    /// Was disabled and at rest, is enabled: started.
    Enabled,
    /// Only policy keys changed. `now` apply to the running process; `next_start` (readiness,
    /// which is judged once per process) from its next start.
    InPlace {
        /// Keys that apply to the running process at once.
        now: Vec<String>,
        /// Keys used from the daemon's next start (`ready`, `ready_timeout`).
        next_start: Vec<String>,
    },
    /// Only the job templates changed: used from the daemon's next start, no restart.
    JobTemplates,
    /// Process keys changed (listed) and it has a live process: restarted.
    Restart(Vec<String>),
    /// Changed, and nothing to do now (no process to restart, or already shutting down).
    Changed,
}

impl Change {
    /// The line `reload` prints for the daemon; None for a daemon added disabled (nothing happens).
    pub fn message(&self) -> Option<String> {
        Some(match self {
            Change::Removed => "removed: stopping".into(),
            Change::Added { start: false } => return None,
            Change::Added { start: true } => "added: starting".into(),
            Change::Disabled => "disabled: stopping".into(),
            Change::Enabled => "enabled: starting".into(),
            Change::InPlace { now, next_start } => {
                let mut parts = Vec::new();
                if !now.is_empty() {
                    parts.push(format!("changed {}: applied in place", now.join(", ")));
                }
                if !next_start.is_empty() {
                    parts.push(format!(
                        "changed {}: used from its next start",
                        next_start.join(", ")
                    ));
                }
                parts.join("; ")
            }
            Change::JobTemplates => {
                "job templates changed: used from its next start (no restart)".into()
            }
            Change::Restart(keys) => format!("changed {}: restarting", keys.join(", ")),
            Change::Changed => "changed".into(),
        })
    }
}

/// A daemon as the supervisor runs it when a reload comes: its configuration and its state.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    /// The configuration it runs with.
    pub config: &'a DaemonConfig,
    /// Its lifecycle state.
    pub state: DaemonState,
}

/// What a reload changes: for every daemon running now (`current`, including ones a previous
/// reload removed that are still stopping) and every daemon of the `new` configuration, the
/// [`Change`] to carry out. Unchanged daemons are left out. Order: removed, then added, then
/// changed, each by name.
pub fn plan(
    current: &BTreeMap<String, Running<'_>>,
    new: &BTreeMap<String, DaemonConfig>,
) -> Vec<(String, Change)> {
    let mut out = Vec::new();
    for name in current.keys().filter(|n| !new.contains_key(*n)) {
        out.push((name.clone(), Change::Removed));
    }
    for (name, cfg) in new.iter().filter(|(n, _)| !current.contains_key(*n)) {
        out.push((name.clone(), Change::Added { start: cfg.enabled }));
    }
    for (name, now) in current {
        let Some(new_cfg) = new.get(name) else {
            continue;
        };
        let old = now.config;
        if old == new_cfg {
            continue;
        }
        let change = match classify(old, new_cfg) {
            _ if old.enabled && !new_cfg.enabled => Change::Disabled,
            _ if !old.enabled && new_cfg.enabled && now.state.is_at_rest() => Change::Enabled,
            ReloadAction::InPlace(keys) => {
                let (next_start, now): (Vec<String>, Vec<String>) = keys
                    .into_iter()
                    .partition(|k| matches!(k.as_str(), "ready" | "ready_timeout"));
                Change::InPlace { now, next_start }
            }
            ReloadAction::JobTemplates => Change::JobTemplates,
            ReloadAction::Restart(keys)
                if now.state.has_process() && now.state != DaemonState::ShuttingDown =>
            {
                Change::Restart(keys)
            }
            _ => Change::Changed,
        };
        out.push((name.clone(), change));
    }
    out
}

/// The settings without `pipeline.jobs`, and `pipeline.jobs` alone.
fn split(settings: &Value) -> (serde_json::Map<String, Value>, Value) {
    let mut keys = settings.as_object().cloned().unwrap_or_default();
    let mut jobs = Value::Null;
    if let Some(Value::Object(p)) = keys.get_mut("pipeline")
        && let Some(j) = p.remove("jobs")
    {
        jobs = j;
    }
    (keys, jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn daemon(yaml_entry: &str) -> DaemonConfig {
        let yaml = format!(
            "daemons:\n  plain:\n    command: [\"sleep\", \"100\"]\n{yaml_entry}pipeline:\n  jobs:\n    train:\n      command: [\"{{worker}}\", \"job\", \"train\"]\n"
        );
        let c = config::parse(&yaml, "test.yaml", &[]).expect("valid config");
        c.daemons["plain"].clone()
    }

    fn with_train(yaml_entry: &str, train: &str) -> DaemonConfig {
        let yaml = format!(
            "daemons:\n  plain:\n    command: [\"sleep\", \"100\"]\n{yaml_entry}pipeline:\n  jobs:\n    train:\n      command: [\"{train}\"]\n"
        );
        config::parse(&yaml, "test.yaml", &[])
            .expect("valid config")
            .daemons["plain"]
            .clone()
    }

    #[test]
    fn the_same_entry_changes_nothing() {
        assert_eq!(classify(&daemon(""), &daemon("")), ReloadAction::Unchanged);
    }

    #[test]
    fn policy_keys_apply_in_place() {
        for entry in [
            "    restart: never\n",
            "    grace_period: 3\n",
            "    max_restarts: 9\n",
            "    backoff_max: 5\n",
            "    heartbeat_timeout: 90\n",
            "    ready:\n      after: 2s\n",
        ] {
            match classify(&daemon(""), &daemon(entry)) {
                ReloadAction::InPlace(keys) => assert_eq!(keys.len(), 1, "{entry}: {keys:?}"),
                other => panic!("{entry}: {other:?}"),
            }
        }
    }

    #[test]
    fn process_keys_restart() {
        for entry in [
            "    env:\n      A: b\n",
            "    interval: 7\n",
            "    settings:\n      x: 1\n",
        ] {
            assert!(
                matches!(
                    classify(&daemon(""), &daemon(entry)),
                    ReloadAction::Restart(_)
                ),
                "{entry}"
            );
        }
        let a = daemon("");
        let mut b = a.clone();
        b.command = Some(vec!["sleep".into(), "200".into()]);
        assert!(matches!(classify(&a, &b), ReloadAction::Restart(_)));
    }

    #[test]
    fn a_process_key_with_a_policy_key_restarts_and_names_both() {
        match classify(
            &daemon(""),
            &daemon("    env:\n      A: b\n    grace_period: 3\n"),
        ) {
            ReloadAction::Restart(keys) => {
                assert!(keys.contains(&"env".to_string()), "{keys:?}");
                assert!(keys.contains(&"grace_period".to_string()), "{keys:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_template_change_restarts_nothing() {
        assert_eq!(
            classify(&with_train("", "a"), &with_train("", "b")),
            ReloadAction::JobTemplates
        );
        // With a policy change as well, it is still in place.
        assert!(matches!(
            classify(
                &with_train("", "a"),
                &with_train("    grace_period: 3\n", "b")
            ),
            ReloadAction::InPlace(_)
        ));
    }

    fn cfg_named(name: &str, entry: &str) -> DaemonConfig {
        let mut c = daemon(entry);
        c.name = name.into();
        c
    }

    #[test]
    fn a_reload_plan_names_each_daemon_once_in_order() {
        let (a, b, c, d, e) = (
            cfg_named("a", ""),
            cfg_named("b", ""),
            cfg_named("c", ""),
            cfg_named("d", "    enabled: false\n"),
            cfg_named("e", ""),
        );
        let running = |config, state| Running { config, state };
        let current: BTreeMap<String, Running> = [
            ("a".to_string(), running(&a, DaemonState::Running)),
            ("b".to_string(), running(&b, DaemonState::Running)),
            ("c".to_string(), running(&c, DaemonState::Stopped)),
            ("d".to_string(), running(&d, DaemonState::Stopped)),
            ("e".to_string(), running(&e, DaemonState::Running)),
        ]
        .into();
        let new: BTreeMap<String, DaemonConfig> = [
            cfg_named("b", "    env:\n      A: b\n"),
            cfg_named("c", "    env:\n      A: b\n"),
            cfg_named("d", ""),
            cfg_named("e", "    grace_period: 3\n    ready:\n      after: 2s\n"),
            cfg_named("f", "    enabled: false\n"),
            cfg_named("g", ""),
        ]
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
        let plan = plan(&current, &new);
        let lines: Vec<(String, Option<String>)> =
            plan.iter().map(|(n, c)| (n.clone(), c.message())).collect();
        let line = |n: &str, m: Option<&str>| (n.to_string(), m.map(str::to_string));
        assert_eq!(
            lines,
            [
                line("a", Some("removed: stopping")),
                line("f", None),
                line("g", Some("added: starting")),
                line("b", Some("changed env: restarting")),
                line("c", Some("changed")),
                line("d", Some("enabled: starting")),
                line(
                    "e",
                    Some(
                        "changed grace_period: applied in place; changed ready: used from its next start"
                    )
                ),
            ]
        );
        assert_eq!(plan[1].1, Change::Added { start: false });
    }

    #[test]
    fn disabling_wins_over_any_other_change() {
        let old = cfg_named("a", "");
        let current = [(
            "a".to_string(),
            Running {
                config: &old,
                state: DaemonState::Running,
            },
        )]
        .into();
        let new = [(
            "a".to_string(),
            cfg_named("a", "    enabled: false\n    env:\n      A: b\n"),
        )]
        .into();
        assert_eq!(plan(&current, &new), [("a".to_string(), Change::Disabled)]);
        assert_eq!(
            Change::JobTemplates.message().unwrap(),
            "job templates changed: used from its next start (no restart)"
        );
    }
}
