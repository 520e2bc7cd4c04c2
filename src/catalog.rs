//! The fifteen built-in daemons, their purpose, default dependencies and profiles.
//!
//! This is the seed system's `DaemonType` enum as data: the config file may override any of it, but
//! a name that is not here (and has no `command:` of its own) is a typo, and is refused as one.

use crate::config_key::ConfigKey;

/// One built-in daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonSpec {
    /// The daemon's name (lower-case identifier).
    pub name: &'static str,
    /// One line on what it does, for `list` and the docs.
    pub purpose: &'static str,
    /// What kind of work it does.
    pub category: Category,
    /// The daemons it needs RUNNING before it starts (the defaults; the configuration may change them).
    pub depends_on: &'static [&'static str],
    /// Enabled in the embedded default configuration (single box).
    pub enabled_by_default: bool,
    /// Daemon-specific configuration keys, beside the common ones.
    pub extra_keys: &'static [&'static str],
}

/// The kind of work a built-in daemon does (the seed system's grouping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// Moves games or models between nodes.
    Sync,
    /// Sync for short-lived (spot) nodes.
    Ephemeral,
    /// The self-improvement loop: export, training, evaluation, promotion.
    Training,
    /// Watches the node and its jobs.
    Health,
    /// Feeds the selfplay work queue.
    Queue,
}

const SOURCES: &[&str] = &[
    "auto_sync",
    "cluster_data_sync",
    "auto_export",
    "quality_monitor",
];

/// The daemons of which one node of a cluster acts at a time (the holder of its lease): the work
/// queue's producer and promotion. `job_reaper` is not among them: what it reaps is this node's
/// own process tree, which every node must keep clean (a reaper standing by would leave stuck
/// jobs running); a cluster part of it comes with the shared work queue.
pub const CLUSTER_SCOPED: &[&str] = &["queue_populator", "auto_promotion"];

/// The cluster-scoped daemons with one lease per config key (`pipeline.config_keys`) rather
/// than one for the whole daemon: promotion of different boards may lead on different nodes.
pub const LEASE_PER_CONFIG_KEY: &[&str] = &["auto_promotion"];

/// A lease's name: the daemon's, or `<daemon>.<config key>` for a lease per key.
pub fn lease_name(daemon: &str, config_key: Option<&str>) -> String {
    match config_key {
        Some(k) => format!("{daemon}.{k}"),
        None => daemon.to_string(),
    }
}

/// The lease an event of `daemon` is emitted under, from its payload: the daemon's own, or for
/// [`LEASE_PER_CONFIG_KEY`] the one of the payload's `config_key` (`<daemon>` alone when it names
/// none, a lease nobody holds). None when `daemon` is not cluster-scoped.
pub fn event_lease(daemon: &str, payload: &serde_json::Value) -> Option<String> {
    if !CLUSTER_SCOPED.contains(&daemon) {
        return None;
    }
    let key = payload.get("config_key").and_then(|k| k.as_str());
    Some(if LEASE_PER_CONFIG_KEY.contains(&daemon) {
        lease_name(daemon, key)
    } else {
        daemon.to_string()
    })
}

/// The leases of a cluster-scoped daemon: `(lease name, config key)`. One named after the daemon,
/// or, for [`LEASE_PER_CONFIG_KEY`], one per key named `<daemon>.<key>` (a valid JetStream KV key:
/// config keys are `[a-z0-9_]`). Empty for a daemon that is not cluster-scoped.
pub fn leases(daemon: &str, config_keys: &[String]) -> Vec<(String, Option<String>)> {
    if !CLUSTER_SCOPED.contains(&daemon) {
        Vec::new()
    } else if LEASE_PER_CONFIG_KEY.contains(&daemon) {
        config_keys
            .iter()
            .map(|k| (lease_name(daemon, Some(k)), Some(k.clone())))
            .collect()
    } else {
        vec![(daemon.to_string(), None)]
    }
}

/// Every built-in daemon, in the order `list` shows them.
pub const DAEMONS: &[DaemonSpec] = &[
    spec(
        "auto_sync",
        "push-from-generator + gossip replication",
        Category::Sync,
        &[],
        true,
        &["targets", "retries", "retry_backoff", "timeout"],
    ),
    spec(
        "ephemeral_sync",
        "aggressive 5 s sync for ephemeral hosts",
        Category::Ephemeral,
        &[],
        false,
        &["targets", "retries", "retry_backoff", "timeout"],
    ),
    spec(
        "cluster_data_sync",
        "P2P mesh data sync",
        Category::Sync,
        &[],
        true,
        &["peers", "timeout"],
    ),
    spec(
        "model_distribution",
        "model sync after promotion",
        Category::Sync,
        &[],
        true,
        &["targets", "retries", "retry_backoff"],
    ),
    spec(
        "training_trigger",
        "data threshold → training",
        Category::Training,
        SOURCES,
        true,
        &[
            "threshold_games",
            "min_samples",
            "cooldown",
            "epochs",
            "learning_rate",
            "failure_backoff",
        ],
    ),
    spec(
        "auto_export",
        "games DB → NPZ export",
        Category::Training,
        &[],
        true,
        &[
            "threshold_games",
            "batch_timeout",
            "replay_window",
            "games_keep",
        ],
    ),
    spec(
        "evaluation",
        "model gauntlet evaluation",
        Category::Training,
        &["training_trigger"],
        true,
        &["games", "queue_limit", "sprt"],
    ),
    spec(
        "auto_promotion",
        "gauntlet → promotion",
        Category::Training,
        &["evaluation"],
        true,
        &[
            "min_win_rate_vs_random",
            "min_win_rate_vs_baseline",
            "min_games",
            "cooldown",
            "max_elo_drop",
            "keep_candidates",
            "keep_backups",
            "pin_every",
            "pinned_keep",
        ],
    ),
    spec(
        "unified_node_health",
        "centralized health checks",
        Category::Health,
        &[],
        true,
        &[
            "min_free_disk_gb",
            "min_available_memory_mb",
            "max_load_per_core",
            "max_root_gb",
        ],
    ),
    spec(
        "quality_monitor",
        "data quality tracking",
        Category::Health,
        &[],
        true,
        &["window_games", "threshold", "min_moves", "max_moves"],
    ),
    spec(
        "idle_resource",
        "spawn selfplay on idle GPUs",
        Category::Health,
        &[],
        true,
        &[
            "cpu_threshold",
            "idle_window",
            "max_extra_jobs",
            "games_per_job",
        ],
    ),
    spec(
        "unified_idle_shutdown",
        "cloud instance idle termination",
        Category::Health,
        &[],
        false,
        &[
            "shutdown_command",
            "idle_minutes",
            "cpu_threshold",
            "min_nodes",
        ],
    ),
    spec(
        "queue_populator",
        "maintain work queue",
        Category::Queue,
        &[],
        true,
        &["target_depth", "games_per_item"],
    ),
    spec(
        "selfplay_scheduler",
        "priority-based selfplay allocation",
        Category::Queue,
        &[],
        true,
        &["slots", "target_games", "staleness_hours", "retry_backoff"],
    ),
    spec(
        "job_reaper",
        "kill stuck processes",
        Category::Queue,
        &[],
        true,
        &["stuck_after", "reap_grace", "dry_run"],
    ),
];

const fn spec(
    name: &'static str,
    purpose: &'static str,
    category: Category,
    depends_on: &'static [&'static str],
    enabled_by_default: bool,
    extra_keys: &'static [&'static str],
) -> DaemonSpec {
    DaemonSpec {
        name,
        purpose,
        category,
        depends_on,
        enabled_by_default,
        extra_keys,
    }
}

/// The six seed profiles and their members.
pub const PROFILES: &[(&str, &[&str])] = &[
    (
        "coordinator",
        &[
            "auto_sync",
            "cluster_data_sync",
            "model_distribution",
            "unified_node_health",
            "quality_monitor",
            "queue_populator",
            "selfplay_scheduler",
            "job_reaper",
        ],
    ),
    (
        "training_node",
        &[
            "auto_sync",
            "cluster_data_sync",
            "auto_export",
            "quality_monitor",
            "training_trigger",
            "evaluation",
            "auto_promotion",
            "model_distribution",
            "job_reaper",
        ],
    ),
    (
        "ephemeral",
        &[
            "ephemeral_sync",
            "idle_resource",
            "unified_idle_shutdown",
            "job_reaper",
        ],
    ),
    (
        "selfplay",
        &[
            "auto_sync",
            "idle_resource",
            "selfplay_scheduler",
            "job_reaper",
        ],
    ),
    (
        "full",
        &[
            "auto_sync",
            "ephemeral_sync",
            "cluster_data_sync",
            "model_distribution",
            "training_trigger",
            "auto_export",
            "evaluation",
            "auto_promotion",
            "unified_node_health",
            "quality_monitor",
            "idle_resource",
            "unified_idle_shutdown",
            "queue_populator",
            "selfplay_scheduler",
            "job_reaper",
        ],
    ),
    (
        "minimal",
        &["auto_sync", "unified_node_health", "job_reaper"],
    ),
];

/// The built-in daemon of that (normalized) name.
pub fn find(name: &str) -> Option<&'static DaemonSpec> {
    DAEMONS.iter().find(|d| d.name == name)
}

/// The config keys the built-in reference jobs (`ringrift-worker job selfplay|export|train|gauntlet`)
/// can play: Hex on 8×8 and 6×6 boards, two players. `config check` holds a configuration that
/// runs a built-in job to these, and the jobs refuse any other key; the game itself lives with the
/// jobs (worker/jobs/game).
pub const REFERENCE_CONFIG_KEYS: &[ConfigKey] = &[ConfigKey::HEX8_2P, ConfigKey::HEX6_2P];

/// True when the built-in reference jobs can play `key` (see [`REFERENCE_CONFIG_KEYS`]).
pub fn is_reference_key(key: &ConfigKey) -> bool {
    REFERENCE_CONFIG_KEYS.contains(key)
}

/// [`REFERENCE_CONFIG_KEYS`] for messages: `hex8_2p, hex6_2p`.
pub fn reference_keys_text() -> String {
    let keys: Vec<String> = REFERENCE_CONFIG_KEYS
        .iter()
        .map(ToString::to_string)
        .collect();
    keys.join(", ")
}

/// Longest daemon name, in bytes. A name becomes a file name (`logs/<name>.log`) and a label value.
pub const MAX_NAME_LEN: usize = 64;

/// Names a daemon may not take: the supervisor's own files (`logs/master_loop.log`, `logs/jobs/`)
/// and the origins the supervisor stamps on events (`supervisor`, `cli`, `http`, `node`).
pub const RESERVED_NAMES: &[&str] = &["master_loop", "supervisor", "jobs", "cli", "http", "node"];

/// Why a daemon name cannot be used; each variant carries the name as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not `[a-z][a-z0-9_]*`. `hint` is the normalized name when that one would be valid.
    #[error(
        "daemon name '{}' is not a lower-case identifier: a letter a-z, then letters, digits or '_'{}",
        .name.escape_debug(),
        .hint.as_ref().map(|h| format!(" (did you mean '{h}'?)")).unwrap_or_default()
    )]
    NotAnIdentifier {
        /// The name as written.
        name: String,
        /// A valid spelling of it (lower case, `-` as `_`), if there is one.
        hint: Option<String>,
    },
    /// Longer than [`MAX_NAME_LEN`] bytes.
    #[error("daemon name '{name}' is {} bytes long; at most {MAX_NAME_LEN}", .name.len())]
    TooLong {
        /// The name as written.
        name: String,
    },
    /// One of [`RESERVED_NAMES`].
    #[error(
        "daemon name '{name}' is reserved for the supervisor ({})",
        RESERVED_NAMES.join(", ")
    )]
    Reserved {
        /// The name as written.
        name: String,
    },
}

/// Checks a daemon name as written in the configuration: a lower-case identifier (`[a-z][a-z0-9_]*`),
/// at most [`MAX_NAME_LEN`] bytes, not one of [`RESERVED_NAMES`]. Names are used as file names, so
/// anything else (`/`, `..`, upper case that would collide case-insensitively) is refused.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let ident = name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ident {
        let hint = normalize(name);
        let hint = (hint != name && check_name(&hint).is_ok()).then_some(hint);
        return Err(NameError::NotAnIdentifier {
            name: name.to_string(),
            hint,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
        });
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(NameError::Reserved {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Daemon names are accepted in either case (`AUTO_SYNC` or `auto_sync`); this is the canonical form.
pub fn normalize(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('-', "_")
}

/// Up to three known names closest to `wrong`, best first, for "did you mean" hints.
pub fn closest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let wrong = normalize(wrong);
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| {
            let d = edit_distance(&wrong, c);
            // A shared prefix or containment is as good as a small typo.
            let d = if c.starts_with(&wrong) || (wrong.len() >= 4 && c.contains(&wrong)) {
                d.min(2)
            } else {
                d
            };
            (d, c)
        })
        .filter(|(d, c)| *d <= (c.len().max(wrong.len()) / 2).max(2))
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, c)| c).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// "did you mean a, b?" or a list of every valid name when nothing is close.
pub fn suggestion<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str> + Clone,
) -> String {
    let close = closest(wrong, candidates.clone());
    if close.is_empty() {
        let all: Vec<&str> = candidates.into_iter().collect();
        format!("valid names: {}", all.join(", "))
    } else {
        format!("did you mean {}?", close.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifteen_daemons_with_unique_names() {
        assert_eq!(DAEMONS.len(), 15);
        let mut names: Vec<_> = DAEMONS.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 15);
    }

    #[test]
    fn seed_dependency_graph() {
        let tt = find("training_trigger").unwrap();
        assert_eq!(
            tt.depends_on,
            &[
                "auto_sync",
                "cluster_data_sync",
                "auto_export",
                "quality_monitor"
            ]
        );
        assert_eq!(
            find("evaluation").unwrap().depends_on,
            &["training_trigger"]
        );
        assert_eq!(find("auto_promotion").unwrap().depends_on, &["evaluation"]);
    }

    #[test]
    fn profiles_name_only_known_daemons() {
        assert_eq!(PROFILES.len(), 6);
        for (p, members) in PROFILES {
            for m in *members {
                assert!(find(m).is_some(), "profile {p} names unknown {m}");
            }
        }
    }

    #[test]
    fn names_are_case_insensitive() {
        assert_eq!(normalize("AUTO_SYNC"), "auto_sync");
        assert_eq!(normalize("auto-sync"), "auto_sync");
    }

    #[test]
    fn bad_names_say_why() {
        let msg = |n: &str| check_name(n).unwrap_err().to_string();
        assert_eq!(
            msg("Auto-Sync"),
            "daemon name 'Auto-Sync' is not a lower-case identifier: a letter a-z, then letters, \
             digits or '_' (did you mean 'auto_sync'?)"
        );
        assert_eq!(
            msg("a/b\n"),
            "daemon name 'a/b\\n' is not a lower-case identifier: a letter a-z, then letters, \
             digits or '_'"
        );
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            msg(&long),
            format!("daemon name '{long}' is 65 bytes long; at most 64")
        );
        assert_eq!(
            msg("jobs"),
            "daemon name 'jobs' is reserved for the supervisor \
             (master_loop, supervisor, jobs, cli, http, node)"
        );
        assert!(check_name("auto_sync").is_ok());
    }

    #[test]
    fn suggestions_find_typos() {
        let names = DAEMONS.iter().map(|d| d.name);
        assert_eq!(closest("auto_synk", names.clone())[0], "auto_sync");
        assert_eq!(closest("AUTO_EXPROT", names.clone())[0], "auto_export");
        assert!(closest("training", names.clone()).contains(&"training_trigger"));
        assert!(suggestion("zzzzzzzzzzzzzzzzzz", names).starts_with("valid names: auto_sync"));
    }
}
