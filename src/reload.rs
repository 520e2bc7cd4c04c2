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

use crate::config::DaemonConfig;

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
}
