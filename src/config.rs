//! Loading and validating `config/unified_loop.yaml`.
//!
//! The file is parsed into a plain JSON tree, environment overrides are laid over that tree, and one
//! validation pass turns it into typed [`Config`], collecting every problem instead of stopping at
//! the first (a user fixing a config wants the whole list). Each problem names the file, the line
//! where the key came from the file, and the dotted key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::catalog::{self, Category};
use crate::deps::{self, Graph};
use crate::limits::{self, Limits};
use crate::readiness::Ready;

mod cluster;
use crate::restart::{RestartPolicy, RestartSettings};
pub use cluster::{
    ClusterConfig, ROLES, TlsConfig, default_node_id, redact, valid_data_address, valid_node_id,
};

/// The embedded default configuration, used when the root has no config/unified_loop.yaml.
pub const DEFAULT_YAML: &str = include_str!("../config/unified_loop.yaml");
/// Where the configuration lives, relative to the root.
pub const CONFIG_RELATIVE_PATH: &str = "config/unified_loop.yaml";

/// A validated configuration: `config/unified_loop.yaml` (or the embedded default) with the
/// environment overrides applied. Built by [`load`], [`load_checked`], [`parse`] or [`parse_in`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from: a path, or `"<embedded default>"`.
    pub source: String,
    /// The `http:` section: the status/metrics server.
    pub http: HttpConfig,
    /// The `logs:` section: rotation of the per-daemon log files.
    pub logs: LogConfig,
    /// Every daemon by canonical (normalized, lower-case) name: every catalog daemon, configured or
    /// not, plus the file's own daemons (those with a `command:`).
    pub daemons: BTreeMap<String, DaemonConfig>,
    /// Profile name → canonical names of its daemons: the catalog's profiles, with those of the
    /// `profiles:` section added or replacing them (for `start --profile NAME`).
    pub profiles: BTreeMap<String, Vec<String>>,
    /// The `pipeline:` section: the config keys the loop plays and its job command templates.
    pub pipeline: PipelineConfig,
    /// How daemons and jobs are contained (`containment:`; see the README's "Containment").
    pub containment: ContainmentMode,
    /// The `cluster:` section (off by default).
    pub cluster: ClusterConfig,
}

/// The top-level `containment:` key: `auto` (a cgroup v2 per daemon and job where the supervisor can
/// have one, else process groups plus the environment sweep) or `process-group` (never cgroups).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ContainmentMode {
    /// `auto` (the default): a cgroup v2 per daemon and job when the supervisor can make them.
    #[default]
    Auto,
    /// `process-group`: never cgroups; process groups plus the environment markers only.
    ProcessGroup,
}

/// The self-improvement loop: which config keys it works on and the command of each kind of job.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// The config keys the loop works on (`<board>_<N>p`, e.g. `hex8_2p`), as written, each checked
    /// by [`crate::config_key::ConfigKey`]; never empty (default `[hex8_2p]`).
    pub config_keys: Vec<String>,
    /// selfplay, export, train, gauntlet → command template and maximum runtime.
    pub jobs: BTreeMap<String, JobTemplate>,
    /// The ssh command (program and options, no host) that rsync runs to reach a `host:path`
    /// target and that runs `sha256sum` there to verify a copy (default [`DEFAULT_SSH`]): give
    /// a port, a key or a known-hosts file here (`[ssh, -p, "2222", -i, /etc/ringrift/id_ed25519]`)
    /// rather than in a user's ~/.ssh/config the supervisor may not read.
    pub ssh: Vec<String>,
    /// What this node runs of the loop at once (`pipeline.capacity`).
    pub capacity: Capacity,
}

/// The node's capacity for the loop (`pipeline.capacity`), configured once: selfplay_scheduler
/// and idle_resource share the selfplay slots (their jobs together never exceed them),
/// training_trigger runs up to `training_slots` train jobs at once (one per config key at most),
/// evaluation up to `evaluation_slots` gauntlets (one per config key at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Selfplay jobs at once on this node, selfplay_scheduler's and idle_resource's together
    /// (1..=1024; default 1, or the deprecated `daemons.selfplay_scheduler.slots`).
    pub selfplay_slots: u64,
    /// Train jobs at once, each of its own config key (1..=64; default 1).
    pub training_slots: u64,
    /// Gauntlet jobs at once, each of its own config key (1..=64; default 1).
    pub evaluation_slots: u64,
    /// GPUs of this node (0..=1024): `None` (the default, `auto`) is what `nvidia-smi -L` lists
    /// where it runs, else 0. With GPUs, each train and gauntlet job gets a
    /// `CUDA_VISIBLE_DEVICES` of its own slot's GPU.
    pub gpus: Option<u64>,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            selfplay_slots: 1,
            training_slots: 1,
            evaluation_slots: 1,
            gpus: None,
        }
    }
}

/// The keys of `pipeline.capacity`.
const CAPACITY_KEYS: &[&str] = &[
    "selfplay_slots",
    "training_slots",
    "evaluation_slots",
    "gpus",
];

/// The ssh command of `pipeline.ssh` when the file does not say: never a password prompt
/// (BatchMode; a daemon has no terminal), and a dead host found within 10 seconds.
pub const DEFAULT_SSH: &[&str] = &["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"];

/// How one kind of job is run (`pipeline.jobs.<kind>`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobTemplate {
    /// Words with `{placeholder}`s, filled in when the job runs.
    pub command: Vec<String>,
    /// Longest the job may run before the supervisor stops it (1 s to 7 days; default 1800 s for
    /// selfplay and export, 3600 s for train and gauntlet, 300 s for validate).
    pub max_runtime: Duration,
    /// How long a job of this kind may go without CPU time (summed over all its processes) and
    /// without output before job_reaper stops it as stuck: `None` (the default) for job_reaper's
    /// own `stuck_after`, `Some(Duration::ZERO)` (`stuck_after: off`) for never (only
    /// `max_runtime` then bounds the job). Given to the job's processes as
    /// [`crate::protocol::JOB_STUCK_AFTER_ENV`], where the reaper reads it.
    pub stuck_after: Option<Duration>,
}

impl JobTemplate {
    /// A fingerprint of what the template runs (command and limits): 16 hex digits, the same
    /// for equal templates across runs and builds (FNV-1a 64 over the words and the limits).
    /// A daemon keeps it with a failure's backoff state, so a changed command starts afresh.
    pub fn fingerprint(&self) -> String {
        job_fingerprint(&self.command, self.max_runtime.as_secs_f64())
    }
}

/// The fingerprint of a job template (see [`JobTemplate::fingerprint`]) from its words and its
/// `max_runtime` in seconds: 16 lower-case hex digits.
pub fn job_fingerprint(command: &[String], max_runtime_secs: f64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for w in command {
        eat(&(w.len() as u64).to_le_bytes());
        eat(w.as_bytes());
    }
    eat(&max_runtime_secs.to_bits().to_le_bytes());
    format!("{h:016x}")
}

/// The key a daemon's settings carry when its node is in a cluster (`cluster.enabled`): its work
/// queue is then the cluster's shared one, reached through the supervisor, not data/work_queue.db.
pub const SHARED_WORK_QUEUE: &str = "shared_work_queue";

/// The kinds of job the pipeline runs: the four steps, and `validate` (optional, none by
/// default): a check of a candidate model in a format of the user's own, run by evaluation
/// before the candidate's gauntlet (exit 0: the model is valid).
pub const JOB_KINDS: &[&str] = &["selfplay", "export", "train", "gauntlet", "validate"];

/// The kinds of job that are always configured (every kind but `validate`).
pub const REQUIRED_JOB_KINDS: &[&str] = &["selfplay", "export", "train", "gauntlet"];

/// The placeholders every kind of job is given: they come from the config key and the root.
pub const COMMON_PLACEHOLDERS: &[&str] = &[
    "worker",
    "root",
    "config_key",
    "board_type",
    "num_players",
    "db_path",
    "npz_path",
    "model_path",
];

/// Per kind of job, the placeholders it is given besides [`COMMON_PLACEHOLDERS`]: the one table
/// `config check` validates templates with and the README's plug-in contract mirrors. The daemon
/// that runs a kind fills exactly these (and may give a common one another value: export's
/// `{npz_path}` is its staging file, the gauntlet's `{model_path}` its baseline).
pub const JOB_PLACEHOLDERS: &[(&str, &[&str])] = &[
    ("selfplay", &["games", "seed"]),
    ("export", &["games", "previous_npz_path", "replay_window"]),
    ("train", &["candidate_path", "epochs", "learning_rate"]),
    (
        "gauntlet",
        &[
            "candidate_path",
            "games",
            "output_path",
            "sprt",
            "reference_dir",
        ],
    ),
    ("validate", &["candidate_path"]),
];

/// Every placeholder a job of `kind` is given, common ones first; empty for an unknown kind.
pub fn job_placeholders(kind: &str) -> Vec<&'static str> {
    match JOB_PLACEHOLDERS.iter().find(|(k, _)| *k == kind) {
        Some((_, own)) => COMMON_PLACEHOLDERS
            .iter()
            .chain(own.iter())
            .copied()
            .collect(),
        None => Vec::new(),
    }
}

/// What a job command template may contain: every placeholder some kind of job is given
/// (the union of [`COMMON_PLACEHOLDERS`] and [`JOB_PLACEHOLDERS`]).
pub const PLACEHOLDERS: &[&str] = &[
    "worker",
    "root",
    "config_key",
    "board_type",
    "num_players",
    "games",
    "db_path",
    "npz_path",
    "previous_npz_path",
    "replay_window",
    "model_path",
    "candidate_path",
    "output_path",
    "epochs",
    "learning_rate",
    "seed",
    "sprt",
    "reference_dir",
];

/// The `{name}`s in one word of a template (`{{` and `}}` are literal braces; see
/// [`crate::template`]).
pub fn placeholders(word: &str) -> Vec<String> {
    crate::template::placeholders(word)
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let t = |words: &[&str], secs: u64| JobTemplate {
            command: words.iter().map(|w| w.to_string()).collect(),
            max_runtime: Duration::from_secs(secs),
            stuck_after: None,
        };
        let jobs = BTreeMap::from([
            (
                "selfplay".to_string(),
                t(
                    &[
                        "{worker}",
                        "job",
                        "selfplay",
                        "--config-key",
                        "{config_key}",
                        "--games",
                        "{games}",
                        "--db",
                        "{db_path}",
                        "--model",
                        "{model_path}",
                        "--seed",
                        "{seed}",
                    ],
                    1800,
                ),
            ),
            (
                "export".to_string(),
                t(
                    &[
                        "{worker}",
                        "job",
                        "export",
                        "--config-key",
                        "{config_key}",
                        "--db",
                        "{db_path}",
                        "--output",
                        "{npz_path}",
                        "--window",
                        "{replay_window}",
                        "--previous",
                        "{previous_npz_path}",
                    ],
                    1800,
                ),
            ),
            (
                "train".to_string(),
                t(
                    &[
                        "{worker}",
                        "job",
                        "train",
                        "--config-key",
                        "{config_key}",
                        "--input",
                        "{npz_path}",
                        "--output",
                        "{candidate_path}",
                        "--init",
                        "{model_path}",
                        "--epochs",
                        "{epochs}",
                        "--lr",
                        "{learning_rate}",
                    ],
                    3600,
                ),
            ),
            (
                "gauntlet".to_string(),
                t(
                    &[
                        "{worker}",
                        "job",
                        "gauntlet",
                        "--config-key",
                        "{config_key}",
                        "--candidate",
                        "{candidate_path}",
                        "--baseline",
                        "{model_path}",
                        "--games",
                        "{games}",
                        "--output",
                        "{output_path}",
                        "--sprt",
                        "{sprt}",
                        "--references",
                        "{reference_dir}",
                    ],
                    3600,
                ),
            ),
        ]);
        PipelineConfig {
            config_keys: vec!["hex8_2p".to_string()],
            jobs,
            ssh: DEFAULT_SSH.iter().map(|w| w.to_string()).collect(),
            capacity: Capacity::default(),
        }
    }
}

/// Why `pipeline.ssh` cannot work, if it cannot: the program first, no empty word, no word
/// with whitespace in the program's place (`"ssh -p 2222"` is one word, not three).
fn bad_ssh(words: &[String]) -> Option<String> {
    let Some(program) = words.first() else {
        return Some("an empty list: name the ssh program first, e.g. [ssh, -p, \"2222\"]".into());
    };
    if program.trim().is_empty() {
        return Some("name the ssh program first, e.g. [ssh, -p, \"2222\"]".into());
    }
    if program.starts_with('-') {
        return Some(format!(
            "'{program}' is an option: name the ssh program first, e.g. [ssh, {program}, ...]"
        ));
    }
    if program.contains(char::is_whitespace) {
        return Some(format!(
            "'{program}' is one word: give the program and each option as words of the list, \
             e.g. [{}]",
            program.split_whitespace().collect::<Vec<_>>().join(", ")
        ));
    }
    if words.iter().any(|w| w.is_empty()) {
        return Some("an empty word: remove it".into());
    }
    None
}

impl Config {
    /// Tells every daemon whether its work queue is the cluster's shared one (the
    /// [`SHARED_WORK_QUEUE`] key of its settings): true while the supervisor is in a cluster. A
    /// reload keeps the running supervisor's answer, as it keeps its `cluster:` section.
    pub fn set_shared_work_queue(&mut self, shared: bool) {
        for d in self.daemons.values_mut() {
            if let Value::Object(m) = &mut d.settings {
                if shared {
                    m.insert(SHARED_WORK_QUEUE.into(), Value::Bool(true));
                } else {
                    m.remove(SHARED_WORK_QUEUE);
                }
            }
        }
    }
}

impl PipelineConfig {
    /// The section as handed to every daemon in its settings (`settings.pipeline`):
    /// `{"config_keys": [...], "jobs": {kind: {"command": [...], "max_runtime": seconds,
    /// "stuck_after": seconds or null}}, "ssh": [...], "capacity": {"selfplay_slots": n,
    /// "training_slots": n, "evaluation_slots": n, "gpus": n or null}}`, durations in
    /// (fractional) seconds (`stuck_after`: null for job_reaper's own, 0 for never; `gpus`:
    /// null for detected on the node).
    pub fn to_json(&self) -> Value {
        let jobs: Map<String, Value> = self
            .jobs
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    serde_json::json!({
                        "command": t.command,
                        "max_runtime": t.max_runtime.as_secs_f64(),
                        "stuck_after": t.stuck_after.map(|d| d.as_secs_f64()),
                    }),
                )
            })
            .collect();
        let c = &self.capacity;
        serde_json::json!({
            "config_keys": self.config_keys,
            "jobs": jobs,
            "ssh": self.ssh,
            "capacity": {
                "selfplay_slots": c.selfplay_slots,
                "training_slots": c.training_slots,
                "evaluation_slots": c.evaluation_slots,
                "gpus": c.gpus,
            },
        })
    }
}

/// The `http:` section: the HTTP status and metrics server.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Whether the server runs at all (default true).
    pub enabled: bool,
    /// Where it listens (default `127.0.0.1:8770`).
    pub addr: SocketAddr,
    /// Connections served at once; one more is refused at once instead of queued.
    pub max_connections: usize,
}

impl HttpConfig {
    /// `max_connections` when the file does not say.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
    /// Far below any sensible descriptor limit; more would defeat the point of a cap.
    pub const MAX_MAX_CONNECTIONS: usize = 4096;
}

/// The `logs:` section: rotation of `logs/<daemon>.log` and the supervisor's own log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Size in bytes at which a log file is rotated (4096 to 1 TiB; default 50 MiB).
    pub max_bytes: u64,
    /// Files kept per log, the live one included: `x.log`, `x.log.1` … `x.log.{max_files-1}` (1 to
    /// 100; default 5; 1 truncates instead of rotating).
    pub max_files: u32,
    /// What `logs/jobs/` keeps of ended jobs' logs (`job_logs_keep` files, default 1,000;
    /// `job_logs_max_age`, default 7 days; `job_logs_max_bytes`, default 1 GiB; 0 is no limit).
    pub job_logs: crate::retention::Limits,
}

/// One daemon's effective settings: its `daemons.<name>` entry over the `defaults:` block over the
/// catalog's defaults. Durations are checked against the ranges given per field.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// The canonical name (the key of [`Config::daemons`], normalized by [`catalog::normalize`]).
    pub name: String,
    /// Whether `start --all` starts it (default: the catalog's say, true for a daemon of
    /// the user's own with a `command:`).
    pub enabled: bool,
    /// Seconds between two cycles of the daemon's work (0.01 s to 1 day; default 60 s).
    pub interval: Duration,
    /// Canonical names of the daemons that must be ready before this one starts (default: the
    /// catalog's; an unknown name or a cycle is a [`Problem`]).
    pub depends_on: Vec<String>,
    /// An external program run instead of the built-in worker.
    pub command: Option<Vec<String>>,
    /// Whether the process speaks the IPC protocol (always true for the built-in worker).
    pub protocol: bool,
    /// Variables added to the process's environment, byte for byte as written (only quoted
    /// strings are accepted: YAML would turn `1.10` into 1.1).
    pub env: BTreeMap<String, String>,
    /// Restart policy, backoff and budget (`restart`, `backoff_initial`, `backoff_max`,
    /// `max_restarts`, `restart_window`, `stable_after`).
    pub restart: RestartSettings,
    /// How long a stopping process has between SIGTERM and SIGKILL (0 to 3600 s; default 10 s).
    pub grace_period: Duration,
    /// How often a worker sends a heartbeat (0.01 to 3600 s; default 5 s); handed to it in its
    /// settings.
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long → killed and restarted by the watchdog; always longer than
    /// `heartbeat_interval` (default six intervals, at least 30 s; at most 1 day).
    pub heartbeat_timeout: Duration,
    /// Progress counters flat for this long while heartbeats arrive → killed as "stalled". None: off.
    pub stall_timeout: Option<Duration>,
    /// Spawned but not RUNNING after this long → killed and restarted (0.01 to 3600 s; default 30 s).
    pub ready_timeout: Duration,
    /// Limits of the daemon's own cgroup (`memory_max`, `cpu_max`).
    pub limits: Limits,
    /// Limits of the cgroup of each job the daemon runs (`job_memory_max`, `job_cpu_max`).
    pub job_limits: Limits,
    /// When the process counts as ready (`ready:`, or the default for its kind); None: it reports.
    pub ready: Option<Ready>,
    /// The whole effective entry as JSON, handed to the worker in its welcome.
    pub settings: Value,
}

impl DaemonConfig {
    /// Whether it runs a program of the user's (`command:`) rather than the built-in worker.
    pub fn is_external(&self) -> bool {
        self.command.is_some()
    }
}

impl Config {
    /// The dependency graph: each daemon's canonical name → its `depends_on`.
    pub fn graph(&self) -> Graph {
        self.daemons
            .iter()
            .map(|(n, d)| (n.clone(), d.depends_on.clone()))
            .collect()
    }

    /// Canonical names of the daemons with `enabled: true` (what `start --all` starts).
    pub fn enabled(&self) -> BTreeSet<String> {
        self.daemons
            .values()
            .filter(|d| d.enabled)
            .map(|d| d.name.clone())
            .collect()
    }

    /// Resolves a user-typed daemon name (any case) to its canonical form, or says it is unknown
    /// (with the closest names, or every name when none is close).
    pub fn resolve(&self, name: &str) -> Result<String, UnknownDaemon> {
        let n = catalog::normalize(name);
        if self.daemons.contains_key(&n) {
            Ok(n)
        } else {
            Err(UnknownDaemon {
                name: name.to_string(),
                suggestion: catalog::suggestion(&n, self.daemons.keys().map(String::as_str)),
            })
        }
    }
}

/// A daemon name that is not in the configuration: "unknown daemon 'x': did you mean y?".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown daemon '{name}': {suggestion}")]
pub struct UnknownDaemon {
    /// The name as the user typed it.
    pub name: String,
    /// "did you mean a, b?" or "valid names: …" ([`catalog::suggestion`]).
    pub suggestion: String,
}

/// Why a program named in a command cannot be run (see [`find_program`]).
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// The command's first word is empty.
    #[error("the program name is empty")]
    Empty,
    /// A path (with a `/`) that cannot be looked at (missing, no permission).
    #[error("program {program:?} cannot be run: {source}")]
    Unreadable {
        /// The program as written.
        program: String,
        /// Why its metadata could not be read.
        source: std::io::Error,
    },
    /// A path that names a directory or another non-file.
    #[error("program {program:?} is not a file")]
    NotAFile {
        /// The program as written.
        program: String,
    },
    /// A path to a file with no execute bit.
    #[error("program {program:?} is not executable")]
    NotExecutable {
        /// The program as written.
        program: String,
    },
    /// A bare name found in no directory of the PATH (as an executable file).
    #[error("program {program:?} is not found on PATH (or not executable); give its full path")]
    NotOnPath {
        /// The program as written.
        program: String,
    },
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as given (a path, or `"<embedded default>"`), or `environment VAR` when the value
    /// came from that environment variable.
    pub file: String,
    /// The 1-based line of the key in the file, when it can be found (never for the environment).
    pub line: Option<usize>,
    /// Dotted key, e.g. `daemons.auto_sync.interval`; empty for whole-file problems.
    pub key: String,
    /// What is wrong and, where it helps, what would be right (a range, the closest names).
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems in the order found; never empty.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// The config file for a root: `<root>/config/unified_loop.yaml` when present; None means the
/// embedded default ([`DEFAULT_YAML`]) applies.
pub fn locate_file(root: &Path) -> Option<PathBuf> {
    let p = root.join(CONFIG_RELATIVE_PATH);
    p.exists().then_some(p)
}

/// Programs that commands name and that cannot be run now, found by [`parse_in`] and
/// [`load_checked`]. Each is a [`Problem`] at the key that names the program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MissingPrograms {
    /// Programs `start --all` would need: those of the enabled daemons, of the daemons they
    /// depend on (started with them, enabled or not), and of the job templates. `config check`
    /// refuses them; `start` and `reload` warn and go on (a program may be installed or mounted
    /// before its daemon spawns, and one daemon's missing program must not keep the others from
    /// starting; its spawn fails and `status` says why).
    pub needed: Vec<Problem>,
    /// Programs of the other daemons (disabled, and no enabled daemon depends on them, e.g. the
    /// `nats` entry of the embedded default on a node that does not host the bus). Nothing runs
    /// them unless they are started by name or profile, so `config check` only notes them.
    pub disabled: Vec<Problem>,
}

/// Loads from an explicit path, or the root's file, or the embedded default; applies the process
/// environment. Programs named by commands are not looked up (see [`load_checked`]).
pub fn load(root: &Path, explicit: Option<&Path>) -> Result<Config, ConfigError> {
    load_checked(root, explicit).map(|(config, _)| config)
}

/// [`load`], and the programs commands name that cannot be run now (see [`parse_in`] and
/// [`MissingPrograms`]).
pub fn load_checked(
    root: &Path,
    explicit: Option<&Path>,
) -> Result<(Config, MissingPrograms), ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| locate_file(root));
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| ConfigError {
                problems: vec![Problem {
                    file: p.display().to_string(),
                    line: None,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }],
            })?;
            parse_in(&text, &p.display().to_string(), &env, root)
        }
        None => parse_in(DEFAULT_YAML, "<embedded default>", &env, root),
    }
}

/// Parses and validates a configuration text with the given environment. Programs named by
/// commands are not looked up (see [`parse_in`]).
pub fn parse(text: &str, file: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    parse_with(text, file, env, None).map(|(config, _)| config)
}

/// [`parse`], and checks that every program a command names exists and is executable: a path
/// (relative ones from `root`, the daemons' working directory) or a name found on the `PATH` of
/// `env`. Those problems come back beside the configuration when nothing else is wrong
/// ([`MissingPrograms`]), and the needed ones with the rest of the problems otherwise.
pub fn parse_in(
    text: &str,
    file: &str,
    env: &[(String, String)],
    root: &Path,
) -> Result<(Config, MissingPrograms), ConfigError> {
    parse_with(text, file, env, Some(root))
}

fn parse_with(
    text: &str,
    file: &str,
    env: &[(String, String)],
    root: Option<&Path>,
) -> Result<(Config, MissingPrograms), ConfigError> {
    let mut v = Validator {
        file,
        text,
        problems: Vec::new(),
        notes: Vec::new(),
        env_origin: BTreeMap::new(),
        selfplay_slots_set: false,
    };
    if let Some((line, byte)) = control_byte(text) {
        return Err(ConfigError {
            problems: vec![Problem {
                file: file.to_string(),
                line: Some(line),
                key: String::new(),
                message: format!(
                    "byte 0x{byte:02x} is not text: a configuration is a YAML text file (is this the right file?)"
                ),
            }],
        });
    }
    let mut tree = match serde_saphyr::from_str::<Value>(text) {
        // A file truncated to nothing (a full disk, an editor crash) must not silently mean
        // "every catalog daemon with its defaults".
        Ok(Value::Null) => {
            return Err(ConfigError {
                problems: vec![Problem {
                    file: file.to_string(),
                    line: None,
                    key: String::new(),
                    message:
                        "holds no YAML mapping (the file is empty or only comments): write at \
                              least `daemons:`, or remove the file to use the embedded default"
                            .into(),
                }],
            });
        }
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            let line = yaml_error_line(&msg);
            return Err(ConfigError {
                problems: vec![Problem {
                    file: file.to_string(),
                    line,
                    key: String::new(),
                    message: format!("invalid YAML: {}", first_line(&msg)),
                }],
            });
        }
    };
    if !tree.is_object() {
        v.problem(
            &[],
            "the top level must be a mapping (daemons:, profiles:, http:, logs:, defaults:)",
        );
        return Err(ConfigError {
            problems: v.problems,
        });
    }
    v.apply_env(&mut tree, env);
    let mut config = v.build(&tree);
    let before = v.problems.len();
    if let Some(root) = root {
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        v.check_programs(&config, root, path_var);
        v.check_cluster_files(&mut config.cluster, root);
    }
    if before == 0 {
        let missing = MissingPrograms {
            needed: std::mem::take(&mut v.problems),
            disabled: std::mem::take(&mut v.notes),
        };
        Ok((config, missing))
    } else {
        Err(ConfigError {
            problems: v.problems,
        })
    }
}

/// The first control character a text file should not hold (NUL, other C0 codes except tab, LF and
/// CR, DEL), as (1-based line, byte). YAML 1.2 §5.1 excludes them from the character set; a parser
/// that reads a run of NULs as an empty document would otherwise accept a damaged file.
fn control_byte(text: &str) -> Option<(usize, u8)> {
    let at = text
        .bytes()
        .position(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f)?;
    let line = text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1;
    Some((line, text.as_bytes()[at]))
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

/// serde-saphyr reports positions as "line N" or "N:M" in its message; take the first.
fn yaml_error_line(msg: &str) -> Option<usize> {
    let lower = msg.to_ascii_lowercase();
    if let Some(i) = lower.find("line ") {
        let digits: String = lower[i + 5..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    // "--> 3:5" style annotated snippets.
    for token in lower.split_whitespace() {
        if let Some((l, c)) = token.split_once(':')
            && !l.is_empty()
            && l.chars().all(|ch| ch.is_ascii_digit())
            && c.chars().next().is_some_and(|ch| ch.is_ascii_digit())
        {
            return l.parse().ok();
        }
    }
    None
}

/// Which daemons an interval variable applies to, by catalog category.
type CategoryFilter = fn(Option<Category>) -> bool;

const TOP_KEYS: &[&str] = &[
    "daemons",
    "profiles",
    "http",
    "logs",
    "defaults",
    "pipeline",
    "containment",
    "cluster",
];
const HTTP_KEYS: &[&str] = &["enabled", "addr", "max_connections"];
const LOG_KEYS: &[&str] = &[
    "max_bytes",
    "max_files",
    "job_logs_keep",
    "job_logs_max_age",
    "job_logs_max_bytes",
];
/// Keys every daemon entry (and the `defaults:` block) may carry.
const COMMON_KEYS: &[&str] = &[
    "enabled",
    "interval",
    "depends_on",
    "command",
    "protocol",
    "env",
    "settings",
    "restart",
    "backoff_initial",
    "backoff_max",
    "max_restarts",
    "restart_window",
    "stable_after",
    "grace_period",
    "heartbeat_interval",
    "heartbeat_timeout",
    "stall_timeout",
    "ready_timeout",
    "memory_max",
    "cpu_max",
    "job_memory_max",
    "job_cpu_max",
    "ready",
];
/// Keys that make sense per daemon but not as shared defaults.
const PER_DAEMON_ONLY: &[&str] = &["depends_on", "command", "env", "settings", "ready"];
/// The forms of `ready:` (src/readiness.rs), and the one key that may go with them.
const READY_FORMS: &[&str] = &["after", "tcp", "http", "command", "log"];

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    problems: Vec<Problem>,
    /// What is worth knowing but not wrong (see [`MissingPrograms::disabled`]).
    notes: Vec<Problem>,
    /// Dotted keys set from the environment → the variable that set them.
    env_origin: BTreeMap<String, String>,
    /// `pipeline.capacity.selfplay_slots` is set (not its default).
    selfplay_slots_set: bool,
}

impl Validator<'_> {
    fn problem(&mut self, path: &[&str], message: impl Into<String>) {
        let p = self.at(path, message);
        self.problems.push(p);
    }

    fn note(&mut self, path: &[&str], message: impl Into<String>) {
        let p = self.at(path, message);
        self.notes.push(p);
    }

    /// A [`Problem`] at this key: its line in the file, or the variable that set it.
    fn at(&self, path: &[&str], message: impl Into<String>) -> Problem {
        let key = path.join(".");
        let (file, line) = match self.env_origin.get(&key) {
            Some(var) => (format!("environment {var}"), None),
            None => (self.file.to_string(), locate(self.text, path)),
        };
        Problem {
            file,
            line,
            key,
            message: message.into(),
        }
    }

    /// Lays environment overrides over the tree: the interval variables, then the generic
    /// `RINGRIFT_<A>__<B>__<C>` form (highest precedence).
    fn apply_env(&mut self, tree: &mut Value, env: &[(String, String)]) {
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let names: Vec<String> = {
            let mut set: BTreeSet<String> = catalog::DAEMONS
                .iter()
                .map(|d| d.name.to_string())
                .collect();
            if let Some(Value::Object(d)) = tree.get("daemons") {
                set.extend(d.keys().cloned());
            }
            set.into_iter().collect()
        };
        let interval_vars: [(&str, CategoryFilter); 3] = [
            ("RINGRIFT_DAEMON_INTERVAL", |_| true),
            ("RINGRIFT_SYNC_INTERVAL", |c| c == Some(Category::Sync)),
            ("RINGRIFT_EPHEMERAL_INTERVAL", |c| {
                c == Some(Category::Ephemeral)
            }),
        ];
        for (var, applies) in interval_vars {
            let Some(raw) = get(var) else { continue };
            for name in &names {
                if applies(catalog::find(name).map(|d| d.category)) {
                    self.set_path(tree, &["daemons", name, "interval"], scalar(&raw), var);
                }
            }
        }
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix("RINGRIFT_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) {
                self.problems.push(Problem {
                    file: format!("environment {var}"),
                    line: None,
                    key: String::new(),
                    message: "empty key segment (expected RINGRIFT_SECTION__KEY)".into(),
                });
                continue;
            }
            let mut path = path;
            // A child's environment is case-sensitive text: the variable keeps its case and its
            // value is never reinterpreted as a YAML scalar.
            let child_env = path.len() == 4 && path[0] == "daemons" && path[2] == "env";
            let value = if child_env {
                if let Some(name) = rest.split("__").nth(3) {
                    path[3] = name.to_string();
                }
                Value::String(raw.clone())
            } else {
                scalar(raw)
            };
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            self.set_path(tree, &refs, value, var);
        }
    }

    fn set_path(&mut self, tree: &mut Value, path: &[&str], value: Value, var: &str) {
        let mut node = tree;
        for (i, seg) in path.iter().enumerate() {
            let Value::Object(map) = node else {
                self.problems.push(Problem {
                    file: format!("environment {var}"),
                    line: None,
                    key: path[..i].join("."),
                    message: "is not a mapping, cannot set a key inside it".into(),
                });
                return;
            };
            if i + 1 == path.len() {
                map.insert(seg.to_string(), value);
                self.env_origin.insert(path.join("."), var.to_string());
                return;
            }
            node = map
                .entry(seg.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }

    fn build(&mut self, tree: &Value) -> Config {
        let top = tree.as_object().expect("checked by the caller");
        self.unknown_keys(top, &[], TOP_KEYS);

        let empty = Map::new();
        let http_map = self.mapping(top.get("http"), &["http"]).unwrap_or(&empty);
        self.unknown_keys(http_map, &["http"], HTTP_KEYS);
        let enabled = self
            .boolean(http_map.get("enabled"), &["http", "enabled"])
            .unwrap_or(true);
        let addr_text = self
            .string(http_map.get("addr"), &["http", "addr"])
            .unwrap_or("127.0.0.1:8770".into());
        let addr = match addr_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    &["http", "addr"],
                    format!("'{addr_text}' is not an address like 127.0.0.1:8770"),
                );
                SocketAddr::from(([127, 0, 0, 1], 8770))
            }
        };
        let max_connections = self
            .integer(
                http_map.get("max_connections"),
                &["http", "max_connections"],
                1,
                HttpConfig::MAX_MAX_CONNECTIONS as u64,
            )
            .map_or(HttpConfig::DEFAULT_MAX_CONNECTIONS, |n| n as usize);
        let http = HttpConfig {
            enabled,
            addr,
            max_connections,
        };

        let logs_map = self.mapping(top.get("logs"), &["logs"]).unwrap_or(&empty);
        self.unknown_keys(logs_map, &["logs"], LOG_KEYS);
        let max_bytes = self
            .integer(
                logs_map.get("max_bytes"),
                &["logs", "max_bytes"],
                4096,
                1 << 40,
            )
            .unwrap_or(50 * 1024 * 1024);
        let max_files = self
            .integer(logs_map.get("max_files"), &["logs", "max_files"], 1, 100)
            .unwrap_or(5) as u32;
        let job_logs = crate::retention::Limits {
            keep: self
                .integer(
                    logs_map.get("job_logs_keep"),
                    &["logs", "job_logs_keep"],
                    0,
                    100_000_000,
                )
                .unwrap_or(1000),
            max_age: self
                .duration(
                    logs_map.get("job_logs_max_age"),
                    &["logs", "job_logs_max_age"],
                    0.0,
                    100.0 * 365.0 * 86_400.0,
                )
                .unwrap_or(Duration::from_secs(7 * 86_400)),
            max_bytes: self
                .integer(
                    logs_map.get("job_logs_max_bytes"),
                    &["logs", "job_logs_max_bytes"],
                    0,
                    1 << 50,
                )
                .unwrap_or(1 << 30),
        };
        let logs = LogConfig {
            max_bytes,
            max_files,
            job_logs,
        };

        let defaults = self
            .mapping(top.get("defaults"), &["defaults"])
            .unwrap_or(&empty)
            .clone();
        let allowed_defaults: Vec<&str> = COMMON_KEYS
            .iter()
            .copied()
            .filter(|k| !PER_DAEMON_ONLY.contains(k))
            .collect();
        self.unknown_keys(&defaults, &["defaults"], &allowed_defaults);

        let daemons_map = self
            .mapping(top.get("daemons"), &["daemons"])
            .unwrap_or(&empty)
            .clone();
        let mut daemons = BTreeMap::new();
        // Every catalog daemon exists, configured or not; entries in the file refine them.
        let mut names: BTreeSet<String> = catalog::DAEMONS
            .iter()
            .map(|d| d.name.to_string())
            .collect();
        for key in daemons_map.keys() {
            if let Err(why) = catalog::check_name(key) {
                self.problem(&["daemons", key], why.to_string());
                continue;
            }
            names.insert(key.clone());
        }
        for name in names {
            let entry_value = daemons_map.get(&name);
            let entry = match entry_value {
                None | Some(Value::Null) => Map::new(),
                Some(v) => match self.mapping(Some(v), &["daemons", &name]) {
                    Some(m) => m.clone(),
                    None => continue,
                },
            };
            if let Some(d) = self.daemon(&name, &entry, &defaults) {
                daemons.insert(name, d);
            }
        }

        let graph: Graph = daemons
            .iter()
            .map(|(n, d)| (n.clone(), d.depends_on.clone()))
            .collect();
        if let Err(errors) = deps::validate(&graph) {
            for e in errors {
                match &e {
                    deps::GraphError::Missing { daemon, missing } => {
                        let hint = catalog::suggestion(missing, daemons.keys().map(String::as_str));
                        self.problem(
                            &["daemons", daemon, "depends_on"],
                            format!("unknown daemon '{missing}': {hint}"),
                        );
                    }
                    deps::GraphError::Cycle(path) => {
                        let first = path.first().cloned().unwrap_or_default();
                        self.problem(&["daemons", &first, "depends_on"], e.to_string());
                    }
                }
            }
        }

        let containment = match self
            .string(top.get("containment"), &["containment"])
            .as_deref()
        {
            None | Some("auto") => ContainmentMode::Auto,
            Some("process-group") => ContainmentMode::ProcessGroup,
            Some(other) => {
                self.problem(
                    &["containment"],
                    format!("'{other}' is not one of auto, process-group"),
                );
                ContainmentMode::Auto
            }
        };
        let profiles = self.profiles(top.get("profiles"), &daemons);
        let cluster = self.cluster(top.get("cluster"));
        let mut pipeline = self.pipeline(top.get("pipeline"));
        self.resolve_selfplay_slots(&mut pipeline.capacity, &daemons);
        self.check_playable(&pipeline);
        // Every daemon sees the pipeline section in its settings: the keys it works on and the job templates.
        let pipeline_json = pipeline.to_json();
        for d in daemons.values_mut() {
            if let Value::Object(m) = &mut d.settings {
                m.insert("pipeline".into(), pipeline_json.clone());
            }
        }
        let mut config = Config {
            source: self.file.to_string(),
            http,
            logs,
            daemons,
            profiles,
            pipeline,
            containment,
            cluster,
        };
        config.set_shared_work_queue(config.cluster.enabled);
        config
    }

    /// Every program a command names must exist and be executable (see [`find_program`]): the
    /// daemons' `command`, `shutdown_command`, and job templates whose program is not a placeholder.
    /// Those of daemons `start --all` would not start are notes (see [`MissingPrograms`]).
    fn check_programs(&mut self, config: &Config, root: &Path, path_var: Option<&str>) {
        let started = deps::with_dependencies(&config.graph(), &config.enabled());
        for d in config.daemons.values() {
            let report = |v: &mut Self, key: &str, e: ProgramError| {
                if started.contains(&d.name) {
                    v.problem(&["daemons", &d.name, key], e.to_string());
                } else {
                    v.note(
                        &["daemons", &d.name, key],
                        format!(
                            "{e} ({} is disabled: needed only once it is enabled, or started by name or profile)",
                            d.name
                        ),
                    );
                }
            };
            if let Some(program) = d.command.as_ref().and_then(|c| c.first())
                && let Err(e) = find_program(program, root, path_var)
            {
                report(self, "command", e);
            }
            if !d.is_external()
                && let Some(program) = d
                    .settings
                    .get("shutdown_command")
                    .and_then(|c| c.get(0))
                    .and_then(Value::as_str)
                && let Err(e) = find_program(program, root, path_var)
            {
                report(self, "shutdown_command", e);
            }
        }
        for (kind, t) in &config.pipeline.jobs {
            if let Some(program) = t.command.first()
                && crate::template::parse(program).is_ok_and(|parts| {
                    parts
                        .iter()
                        .all(|p| matches!(p, crate::template::Part::Literal(_)))
                })
                && let Err(e) = find_program(
                    &crate::template::expand(program, |_| None).unwrap_or_default(),
                    root,
                    path_var,
                )
            {
                self.problem(&["pipeline", "jobs", kind, "command"], e.to_string());
            }
        }
    }

    /// Config keys the built-in jobs cannot play are refused while any built-in job is configured
    /// (a pipeline whose jobs are all the user's own may name any well-formed key).
    fn check_playable(&mut self, pipeline: &PipelineConfig) {
        let builtin: Vec<&str> = pipeline
            .jobs
            .iter()
            .filter(|(kind, t)| {
                t.command.len() >= 3
                    && t.command[0] == "{worker}"
                    && t.command[1] == "job"
                    && &t.command[2] == *kind
            })
            .map(|(kind, _)| kind.as_str())
            .collect();
        if builtin.is_empty() {
            return;
        }
        for key in &pipeline.config_keys {
            if !key
                .parse()
                .is_ok_and(|k| crate::catalog::is_reference_key(&k))
            {
                self.problem(
                    &["pipeline", "config_keys"],
                    format!(
                        "'{key}' cannot be played by the built-in {} job{} (they play {}); \
                         configure jobs of your own for it under pipeline.jobs",
                        builtin.join(", "),
                        if builtin.len() == 1 { "" } else { "s" },
                        crate::catalog::reference_keys_text()
                    ),
                );
            }
        }
    }

    fn pipeline(&mut self, v: Option<&Value>) -> PipelineConfig {
        let mut out = PipelineConfig::default();
        let Some(map) = self.mapping(v, &["pipeline"]).cloned() else {
            return out;
        };
        self.unknown_keys(
            &map,
            &["pipeline"],
            &["config_keys", "jobs", "ssh", "capacity"],
        );
        out.capacity = self.capacity(map.get("capacity"));
        match map.get("ssh") {
            None | Some(Value::Null) => {}
            Some(Value::Array(_)) => {
                if let Some(ssh) = self.string_list(map.get("ssh"), &["pipeline", "ssh"]) {
                    if let Some(why) = bad_ssh(&ssh) {
                        self.problem(&["pipeline", "ssh"], why);
                    } else {
                        out.ssh = ssh;
                    }
                }
            }
            Some(_) => self.problem(
                &["pipeline", "ssh"],
                "a list of words, the program first: [ssh, -p, \"2222\", -i, /etc/ringrift/key]",
            ),
        }
        if let Some(keys) = self.string_list(map.get("config_keys"), &["pipeline", "config_keys"]) {
            let mut good = Vec::new();
            for k in keys {
                match k.parse::<crate::config_key::ConfigKey>() {
                    Ok(_) => good.push(k),
                    Err(e) => self.problem(&["pipeline", "config_keys"], e.to_string()),
                }
            }
            if good.is_empty() {
                self.problem(
                    &["pipeline", "config_keys"],
                    "name at least one config key, e.g. [hex8_2p]",
                );
            } else {
                out.config_keys = good;
            }
        }
        let Some(jobs) = self
            .mapping(map.get("jobs"), &["pipeline", "jobs"])
            .cloned()
        else {
            return out;
        };
        self.unknown_keys(&jobs, &["pipeline", "jobs"], JOB_KINDS);
        for (kind, spec) in &jobs {
            let Some(spec) = self
                .mapping(Some(spec), &["pipeline", "jobs", kind])
                .cloned()
            else {
                continue;
            };
            self.unknown_keys(
                &spec,
                &["pipeline", "jobs", kind],
                &["command", "max_runtime", "stuck_after"],
            );
            if !JOB_KINDS.contains(&kind.as_str()) {
                continue;
            }
            if !REQUIRED_JOB_KINDS.contains(&kind.as_str()) && spec.get("command").is_none() {
                self.problem(
                    &["pipeline", "jobs", kind, "command"],
                    format!("a {kind} job needs a command"),
                );
            }
            let template = out.jobs.entry(kind.clone()).or_insert_with(|| JobTemplate {
                command: Vec::new(),
                max_runtime: Duration::from_secs(300),
                stuck_after: None,
            });
            let given = job_placeholders(kind);
            if let Some(cmd) =
                self.string_list(spec.get("command"), &["pipeline", "jobs", kind, "command"])
            {
                if cmd.is_empty() {
                    self.problem(
                        &["pipeline", "jobs", kind, "command"],
                        "must name a program",
                    );
                }
                for word in &cmd {
                    if let Err(e) = crate::template::parse(word) {
                        self.problem(&["pipeline", "jobs", kind, "command"], e.to_string());
                    }
                    for p in placeholders(word) {
                        if !PLACEHOLDERS.contains(&p.as_str()) {
                            let hint = crate::catalog::suggestion(&p, PLACEHOLDERS.iter().copied());
                            self.problem(
                                &["pipeline", "jobs", kind, "command"],
                                format!("unknown placeholder {{{p}}}: {hint}"),
                            );
                        } else if !given.contains(&p.as_str()) {
                            let list: Vec<String> =
                                given.iter().map(|g| format!("{{{g}}}")).collect();
                            self.problem(
                                &["pipeline", "jobs", kind, "command"],
                                format!(
                                    "{{{p}}} is not given to {kind} jobs; a {kind} job gets {}",
                                    list.join(" ")
                                ),
                            );
                        }
                    }
                }
                template.command = cmd;
            }
            if let Some(d) = self.duration(
                spec.get("max_runtime"),
                &["pipeline", "jobs", kind, "max_runtime"],
                1.0,
                7.0 * 86_400.0,
            ) {
                template.max_runtime = d;
            }
            match spec.get("stuck_after") {
                None | Some(Value::Null) => {}
                // YAML 1.1 reads a bare `off` as false.
                Some(Value::Bool(false)) => template.stuck_after = Some(Duration::ZERO),
                Some(Value::String(off)) if off == "off" => {
                    template.stuck_after = Some(Duration::ZERO);
                }
                v => {
                    if let Some(d) = self.duration(
                        v,
                        &["pipeline", "jobs", kind, "stuck_after"],
                        1.0,
                        7.0 * 86_400.0,
                    ) {
                        template.stuck_after = Some(d);
                    }
                }
            }
        }
        out
    }

    /// `pipeline.capacity`; `selfplay_slots` left at its default here is resolved against the
    /// deprecated `daemons.selfplay_scheduler.slots` by [`Checker::resolve_selfplay_slots`].
    fn capacity(&mut self, v: Option<&Value>) -> Capacity {
        let mut out = Capacity::default();
        let at = ["pipeline", "capacity"];
        let Some(map) = self.mapping(v, &at).cloned() else {
            return out;
        };
        self.unknown_keys(&map, &at, CAPACITY_KEYS);
        let path = |k: &'static str| ["pipeline", "capacity", k];
        if let Some(n) = self.integer(map.get("selfplay_slots"), &path("selfplay_slots"), 1, 1024) {
            out.selfplay_slots = n;
            self.selfplay_slots_set = true;
        }
        if let Some(n) = self.integer(map.get("training_slots"), &path("training_slots"), 1, 64) {
            out.training_slots = n;
        }
        if let Some(n) = self.integer(
            map.get("evaluation_slots"),
            &path("evaluation_slots"),
            1,
            64,
        ) {
            out.evaluation_slots = n;
        }
        match map.get("gpus") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "auto" => {}
            v => out.gpus = self.integer(v, &path("gpus"), 0, 1024),
        }
        out
    }

    /// The selfplay slots when the file sets them the old way, `daemons.selfplay_scheduler.slots`
    /// (deprecated: idle_resource could not see them): taken as `pipeline.capacity.selfplay_slots`
    /// when that is not set, with a note; a conflict between the two is a problem.
    fn resolve_selfplay_slots(
        &mut self,
        capacity: &mut Capacity,
        daemons: &BTreeMap<String, DaemonConfig>,
    ) {
        let old = daemons
            .get("selfplay_scheduler")
            .and_then(|d| d.settings.get("slots"))
            .and_then(|v| match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            });
        let Some(old) = old else {
            return;
        };
        let at = ["daemons", "selfplay_scheduler", "slots"];
        if !self.selfplay_slots_set {
            capacity.selfplay_slots = old;
            self.note(
                &at,
                format!(
                    "deprecated: write `pipeline: {{capacity: {{selfplay_slots: {old}}}}}` instead \
                     (the node's selfplay slots, shared with idle_resource); taken as that for now"
                ),
            );
        } else if old != capacity.selfplay_slots {
            self.problem(
                &at,
                format!(
                    "{old} contradicts pipeline.capacity.selfplay_slots ({}): set only \
                     pipeline.capacity.selfplay_slots (this key is deprecated)",
                    capacity.selfplay_slots
                ),
            );
        } else {
            self.note(
                &at,
                "deprecated and redundant: pipeline.capacity.selfplay_slots says the same; remove it",
            );
        }
    }

    fn daemon(
        &mut self,
        name: &str,
        entry: &Map<String, Value>,
        defaults: &Map<String, Value>,
    ) -> Option<DaemonConfig> {
        let spec = catalog::find(name);
        let path =
            |k: &'static str| -> [String; 3] { ["daemons".into(), name.to_string(), k.into()] };
        let p = |k: &'static str| path(k);
        let has_command = entry.get("command").is_some_and(|c| !c.is_null());
        if spec.is_none() && !has_command {
            let hint = catalog::suggestion(name, catalog::DAEMONS.iter().map(|d| d.name));
            self.problem(
                &["daemons", name],
                format!(
                    "unknown daemon '{name}': {hint} (a daemon of your own needs a `command:`)"
                ),
            );
            return None;
        }
        let mut allowed: Vec<&str> = COMMON_KEYS.to_vec();
        if let Some(s) = spec {
            allowed.extend_from_slice(s.extra_keys);
        }
        self.unknown_keys(entry, &["daemons", name], &allowed);

        // A value from the entry, else from `defaults:`.
        let pick = |k: &str| entry.get(k).or_else(|| defaults.get(k));
        let pick_path = |k: &'static str| -> Vec<String> {
            if entry.contains_key(k) || !defaults.contains_key(k) {
                p(k).to_vec()
            } else {
                vec!["defaults".into(), k.into()]
            }
        };
        macro_rules! at {
            ($k:literal) => {
                &pick_path($k).iter().map(String::as_str).collect::<Vec<_>>()
            };
        }

        let enabled = self.boolean(pick("enabled"), at!("enabled")).unwrap_or(
            spec.is_some_and(|s| s.enabled_by_default) || (spec.is_none() && has_command),
        );
        let interval = self
            .duration(pick("interval"), at!("interval"), 0.01, 86_400.0)
            .unwrap_or(Duration::from_secs(60));
        let depends_on = match entry.get("depends_on") {
            None => spec
                .map(|s| s.depends_on.iter().map(|d| d.to_string()).collect())
                .unwrap_or_default(),
            Some(v) => self
                .string_list(Some(v), &["daemons", name, "depends_on"])
                .unwrap_or_default(),
        };
        let depends_on: Vec<String> = depends_on.iter().map(|d| catalog::normalize(d)).collect();
        let command = match entry.get("command") {
            None | Some(Value::Null) => None,
            Some(v) => match self.string_list(Some(v), &["daemons", name, "command"]) {
                Some(c) if c.is_empty() => {
                    self.problem(
                        &["daemons", name, "command"],
                        "must name a program, e.g. [\"python3\", \"my_daemon.py\"]",
                    );
                    None
                }
                other => other,
            },
        };
        let protocol = match command {
            None => true,
            Some(_) => self
                .boolean(pick("protocol"), at!("protocol"))
                .unwrap_or(false),
        };
        let env = match entry.get("env") {
            None => BTreeMap::new(),
            Some(v) => match self.mapping(Some(v), &["daemons", name, "env"]) {
                None => BTreeMap::new(),
                Some(m) => {
                    let mut env = BTreeMap::new();
                    for (k, v) in m {
                        match v {
                            Value::String(s) => {
                                env.insert(k.clone(), s.clone());
                            }
                            // YAML reads `1.10` as the number 1.1, `on` or `yes` may become
                            // booleans, `~` nothing: the text written is gone by the time the tree
                            // is built, so only a quoted string can reach the child byte for byte.
                            other => self.problem(
                                &["daemons", name, "env", k],
                                format!(
                                    "environment values must be strings: YAML reads this as {}, which may not be the text written; quote it (\"...\")",
                                    kind(other)
                                ),
                            ),
                        }
                    }
                    env
                }
            },
        };
        if let Some(s) = entry.get("settings") {
            self.mapping(Some(s), &["daemons", name, "settings"]);
        }

        let mut restart = RestartSettings::default();
        if let Some(raw) = self.string(pick("restart"), at!("restart")) {
            match RestartPolicy::parse(&raw) {
                Some(pol) => restart.policy = pol,
                None => self.problem(
                    at!("restart"),
                    format!("'{raw}' is not one of always, on_failure, never"),
                ),
            }
        }
        if let Some(d) = self.duration(pick("backoff_initial"), at!("backoff_initial"), 0.0, 3600.0)
        {
            restart.backoff_initial = d;
        }
        if let Some(d) = self.duration(pick("backoff_max"), at!("backoff_max"), 0.0, 86_400.0) {
            restart.backoff_max = d;
        }
        if restart.backoff_initial > restart.backoff_max {
            self.problem(at!("backoff_initial"), "must not exceed backoff_max");
        }
        if let Some(n) = self.integer(pick("max_restarts"), at!("max_restarts"), 1, 1_000_000) {
            restart.max_restarts = n as u32;
        }
        if let Some(d) = self.duration(
            pick("restart_window"),
            at!("restart_window"),
            0.001,
            86_400.0 * 7.0,
        ) {
            restart.restart_window = d;
        }
        if let Some(d) = self.duration(pick("stable_after"), at!("stable_after"), 0.0, 86_400.0) {
            restart.stable_after = d;
        }
        let grace_period = self
            .duration(pick("grace_period"), at!("grace_period"), 0.0, 3600.0)
            .unwrap_or(Duration::from_secs(10));
        let heartbeat_interval = self
            .duration(
                pick("heartbeat_interval"),
                at!("heartbeat_interval"),
                0.01,
                3600.0,
            )
            .unwrap_or(Duration::from_secs(5));
        let heartbeat_timeout = self
            .duration(
                pick("heartbeat_timeout"),
                at!("heartbeat_timeout"),
                0.02,
                86_400.0,
            )
            .unwrap_or_else(|| (heartbeat_interval * 6).max(Duration::from_secs(30)));
        if heartbeat_timeout <= heartbeat_interval {
            self.problem(
                at!("heartbeat_timeout"),
                format!(
                    "must be longer than heartbeat_interval ({}s)",
                    heartbeat_interval.as_secs_f64()
                ),
            );
        }
        let stall_timeout = match pick("stall_timeout") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => None,
            v => self.duration(v, at!("stall_timeout"), 0.01, 86_400.0 * 7.0),
        };
        let ready_timeout = self
            .duration(pick("ready_timeout"), at!("ready_timeout"), 0.01, 3600.0)
            .unwrap_or(Duration::from_secs(30));

        let limits = Limits {
            memory_max: self.limit(pick("memory_max"), at!("memory_max"), limits::parse_memory),
            cpu_max: self.limit(pick("cpu_max"), at!("cpu_max"), limits::parse_cpu),
        };
        let job_limits = Limits {
            memory_max: self.limit(
                pick("job_memory_max"),
                at!("job_memory_max"),
                limits::parse_memory,
            ),
            cpu_max: self.limit(pick("job_cpu_max"), at!("job_cpu_max"), limits::parse_cpu),
        };
        let ready = match entry.get("ready") {
            None | Some(Value::Null) => Ready::default_for(protocol),
            Some(v) => self.ready(v, protocol, &["daemons", name, "ready"]),
        };
        if let Some(Ready::After(after)) = &ready
            && *after >= ready_timeout
        {
            // It would be killed as "not ready" before it could ever count as ready.
            self.problem(
                &["daemons", name, "ready", "after"],
                format!(
                    "must be shorter than ready_timeout ({}s)",
                    ready_timeout.as_secs_f64()
                ),
            );
        }

        // The effective settings handed to the process: defaults, then the entry, then the resolved values.
        let mut settings = defaults.clone();
        for (k, v) in entry {
            settings.insert(k.clone(), v.clone());
        }
        if spec.is_some() && !has_command {
            let mut r = crate::settings::Reader::new(&settings);
            crate::settings::check(name, &mut r);
            for (key, message) in r.problems {
                self.problem(&["daemons", name, &key], message);
            }
        }
        settings.insert("name".into(), Value::from(name));
        settings.insert("interval".into(), Value::from(interval.as_secs_f64()));
        settings.insert(
            "heartbeat_interval".into(),
            Value::from(heartbeat_interval.as_secs_f64()),
        );
        if let Some(s) = spec {
            settings.insert("purpose".into(), Value::from(s.purpose));
        }

        Some(DaemonConfig {
            name: name.to_string(),
            enabled,
            interval,
            depends_on,
            command,
            protocol,
            env,
            restart,
            grace_period,
            heartbeat_interval,
            heartbeat_timeout,
            stall_timeout,
            ready_timeout,
            limits,
            job_limits,
            ready,
            settings: Value::Object(settings),
        })
    }

    fn profiles(
        &mut self,
        v: Option<&Value>,
        daemons: &BTreeMap<String, DaemonConfig>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = catalog::PROFILES
            .iter()
            .map(|(n, m)| (n.to_string(), m.iter().map(|s| s.to_string()).collect()))
            .collect();
        let Some(map) = self.mapping(v, &["profiles"]).cloned() else {
            return out;
        };
        for (name, members) in &map {
            let Some(list) = self.string_list(Some(members), &["profiles", name]) else {
                continue;
            };
            let mut resolved = Vec::new();
            for m in list {
                let n = catalog::normalize(&m);
                if daemons.contains_key(&n) {
                    resolved.push(n);
                } else {
                    let hint = catalog::suggestion(&n, daemons.keys().map(String::as_str));
                    self.problem(&["profiles", name], format!("unknown daemon '{m}': {hint}"));
                }
            }
            out.insert(name.clone(), resolved);
        }
        out
    }

    /// A `ready:` entry: exactly one of [`READY_FORMS`], plus `interval` for the probing forms.
    fn ready(&mut self, v: &Value, protocol: bool, at: &[&str]) -> Option<Ready> {
        let map = self.mapping(Some(v), at)?.clone();
        let mut allowed = READY_FORMS.to_vec();
        allowed.push("interval");
        self.unknown_keys(&map, at, &allowed);
        let forms: Vec<&str> = READY_FORMS
            .iter()
            .copied()
            .filter(|f| map.contains_key(*f))
            .collect();
        if forms.len() != 1 {
            self.problem(
                at,
                format!(
                    "must hold exactly one of after, tcp, http, command, log (found {})",
                    if forms.is_empty() {
                        "none".to_string()
                    } else {
                        forms.join(", ")
                    }
                ),
            );
            return None;
        }
        if protocol {
            self.problem(
                at,
                "a daemon that speaks the protocol reports its own readiness; ready: is for plain programs",
            );
            return None;
        }
        let form = forms[0];
        let path: Vec<&str> = at.iter().copied().chain([form]).collect();
        let ipath: Vec<&str> = at.iter().copied().chain(["interval"]).collect();
        let interval = self
            .duration(map.get("interval"), &ipath, 0.01, 3600.0)
            .unwrap_or(crate::readiness::DEFAULT_PROBE_INTERVAL);
        match form {
            "after" => self
                .duration(map.get("after"), &path, 0.0, 3600.0)
                .map(Ready::After),
            "tcp" => {
                let addr = self.string(map.get("tcp"), &path)?;
                if addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    self.problem(&path, format!("'{addr}' is not host:port"));
                    return None;
                }
                Some(Ready::Tcp { addr, interval })
            }
            "http" => {
                let text = self.string(map.get("http"), &path)?;
                match crate::readiness::parse_http_url(&text) {
                    Ok(url) => Some(Ready::Http { url, interval }),
                    Err(e) => {
                        self.problem(&path, e.to_string());
                        None
                    }
                }
            }
            "command" => {
                let argv = self.string_list(map.get("command"), &path)?;
                if argv.is_empty() {
                    self.problem(&path, "must name a program, e.g. [\"pg_isready\"]");
                    return None;
                }
                Some(Ready::Command { argv, interval })
            }
            _ => {
                let text = self.string(map.get("log"), &path)?;
                if text.is_empty() {
                    self.problem(&path, "must not be empty");
                    return None;
                }
                Some(Ready::Log(text))
            }
        }
    }

    fn unknown_keys(&mut self, map: &Map<String, Value>, at: &[&str], allowed: &[&str]) {
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                let mut path = at.to_vec();
                path.push(key);
                let hint = catalog::suggestion(key, allowed.iter().copied());
                self.problem(&path, format!("unknown key: {hint}"));
            }
        }
    }

    fn mapping<'v>(&mut self, v: Option<&'v Value>, at: &[&str]) -> Option<&'v Map<String, Value>> {
        match v? {
            Value::Object(m) => Some(m),
            Value::Null => None,
            other => {
                self.problem(at, format!("must be a mapping, found {}", kind(other)));
                None
            }
        }
    }

    fn boolean(&mut self, v: Option<&Value>, at: &[&str]) -> Option<bool> {
        match v? {
            Value::Bool(b) => Some(*b),
            Value::String(s) if matches!(s.as_str(), "true" | "yes" | "on" | "1") => Some(true),
            Value::String(s) if matches!(s.as_str(), "false" | "no" | "off" | "0") => Some(false),
            other => {
                self.problem(at, format!("must be true or false, found {}", kind(other)));
                None
            }
        }
    }

    /// A resource limit (`memory_max: 512M`, `cpu_max: 50%`), parsed by `parse`.
    fn limit<T>(
        &mut self,
        v: Option<&Value>,
        at: &[&str],
        parse: fn(&str) -> Result<T, limits::LimitError>,
    ) -> Option<T> {
        let text = self.string(v, at)?;
        match parse(&text) {
            Ok(l) => Some(l),
            Err(e) => {
                self.problem(at, e.to_string());
                None
            }
        }
    }

    fn string(&mut self, v: Option<&Value>, at: &[&str]) -> Option<String> {
        match v? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.problem(at, format!("must be a string, found {}", kind(other)));
                None
            }
        }
    }

    fn string_list(&mut self, v: Option<&Value>, at: &[&str]) -> Option<Vec<String>> {
        match v? {
            Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        Value::Number(n) => out.push(n.to_string()),
                        other => {
                            self.problem(
                                at,
                                format!("must be a list of strings, found {} in it", kind(other)),
                            );
                            return None;
                        }
                    }
                }
                Some(out)
            }
            // "a, b" from an environment variable.
            Value::String(s) => Some(
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect(),
            ),
            Value::Null => Some(Vec::new()),
            other => {
                self.problem(
                    at,
                    format!("must be a list of strings, found {}", kind(other)),
                );
                None
            }
        }
    }

    fn integer(&mut self, v: Option<&Value>, at: &[&str], min: u64, max: u64) -> Option<u64> {
        let v = v?;
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.problem(at, format!("{n} is out of range ({min}..={max})"));
                None
            }
            None => {
                self.problem(
                    at,
                    format!(
                        "must be a whole number from {min} to {max}, found {}",
                        show(v)
                    ),
                );
                None
            }
        }
    }

    /// A duration (see [`crate::settings::parse_duration`]) between the bounds, in seconds.
    fn duration(
        &mut self,
        v: Option<&Value>,
        at: &[&str],
        min_secs: f64,
        max_secs: f64,
    ) -> Option<Duration> {
        match crate::settings::parse_duration(v?) {
            Ok(d) if d.as_secs_f64() >= min_secs && d.as_secs_f64() <= max_secs => Some(d),
            Ok(d) => {
                self.problem(
                    at,
                    format!(
                        "{} seconds is out of range ({min_secs}..={max_secs} seconds)",
                        d.as_secs_f64()
                    ),
                );
                None
            }
            Err(e) => {
                self.problem(at, e.to_string());
                None
            }
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Where `program` is: a path (with a `/`; relative ones from `root`) that must be an executable
/// file, or a name searched on `path_var` (the `PATH` the supervisor will spawn with). The error
/// says which and why.
pub fn find_program(
    program: &str,
    root: &Path,
    path_var: Option<&str>,
) -> Result<PathBuf, ProgramError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.is_empty() {
        return Err(ProgramError::Empty);
    }
    if program.contains('/') {
        let p = root.join(program);
        return match std::fs::metadata(&p) {
            Err(source) => Err(ProgramError::Unreadable {
                program: program.to_string(),
                source,
            }),
            Ok(m) if !m.is_file() => Err(ProgramError::NotAFile {
                program: program.to_string(),
            }),
            Ok(_) if !executable(&p) => Err(ProgramError::NotExecutable {
                program: program.to_string(),
            }),
            Ok(_) => Ok(p),
        };
    }
    let path_var = path_var.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| ProgramError::NotOnPath {
            program: program.to_string(),
        })
}

/// How a value is named in a message: a string quoted, anything else by its kind.
pub fn show_value(v: &Value) -> String {
    show(v)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        other => kind(other).to_string(),
    }
}

/// An environment value read as a YAML scalar or flow collection ("5", "true", "[a, b]"), else as text.
fn scalar(raw: &str) -> Value {
    match serde_saphyr::from_str::<Value>(raw) {
        Ok(Value::Null) if !raw.trim().is_empty() && raw.trim() != "null" && raw.trim() != "~" => {
            Value::String(raw.to_string())
        }
        Ok(v) => v,
        Err(_) => Value::String(raw.to_string()),
    }
}

/// The 1-based line where a dotted key is written in block-style YAML, if it is.
pub fn locate(text: &str, path: &[&str]) -> Option<usize> {
    let mut depth = 0;
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        if depth == path.len() {
            break;
        }
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if let Some(pi) = parent_indent
            && indent <= pi
        {
            // Left the parent's block without finding the key.
            return found;
        }
        let key = trimmed
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        if trimmed.contains(':') && key == path[depth] {
            found = Some(i + 1);
            parent_indent = Some(indent);
            depth += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Config {
        parse(text, "test.yaml", &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn capacity_is_configured_once_and_checked() {
        let c = ok("pipeline:\n  capacity:\n    training_slots: 3\n    gpus: 2\n");
        assert_eq!(
            c.pipeline.capacity,
            Capacity {
                selfplay_slots: 1,
                training_slots: 3,
                evaluation_slots: 1,
                gpus: Some(2),
            }
        );
        let json = c.pipeline.to_json();
        assert_eq!(json["capacity"]["training_slots"], 3);
        assert_eq!(json["capacity"]["gpus"], 2);
        assert_eq!(
            ok("pipeline:\n  capacity:\n    gpus: auto\n")
                .pipeline
                .capacity,
            Capacity::default()
        );
        let e = err("pipeline:\n  capacity:\n    training_slots: 0\n", &[]);
        assert_eq!(e.problems[0].key, "pipeline.capacity.training_slots");
        assert!(
            e.problems[0].message.contains("out of range (1..=64)"),
            "{e}"
        );
        let e = err("pipeline:\n  capacity:\n    trainig_slots: 2\n", &[]);
        assert!(e.to_string().contains("training_slots"), "{e}");
        let e = err("pipeline:\n  capacity:\n    evaluation_slots: many\n", &[]);
        assert_eq!(e.problems[0].key, "pipeline.capacity.evaluation_slots");
    }

    #[test]
    fn the_old_selfplay_slots_key_is_read_with_a_note_and_never_contradicts() {
        let old = "daemons:\n  selfplay_scheduler:\n    slots: 3\n";
        assert_eq!(ok(old).pipeline.capacity.selfplay_slots, 3);
        let dir = std::env::temp_dir();
        let (_, missing) = parse_in(old, "test.yaml", &[], &dir).unwrap();
        assert!(
            missing
                .disabled
                .iter()
                .any(|n| n.key == "daemons.selfplay_scheduler.slots"
                    && n.message.contains("deprecated")),
            "{missing:?}"
        );
        let both = format!("{old}pipeline:\n  capacity:\n    selfplay_slots: 4\n");
        let e = err(&both, &[]);
        assert_eq!(e.problems[0].key, "daemons.selfplay_scheduler.slots");
        assert!(e.problems[0].message.contains("contradicts"), "{e}");
        let same = format!("{old}pipeline:\n  capacity:\n    selfplay_slots: 3\n");
        assert_eq!(ok(&same).pipeline.capacity.selfplay_slots, 3);
    }

    fn err(text: &str, env: &[(&str, &str)]) -> ConfigError {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        parse(text, "test.yaml", &env).expect_err("config should be refused")
    }

    #[test]
    fn limits_and_containment_are_typed() {
        let c = ok(
            "containment: process-group\ndefaults:\n  cpu_max: 50%\ndaemons:\n  auto_sync:\n    memory_max: 512M\n    job_memory_max: 1G\n    job_cpu_max: \"20000 100000\"\n",
        );
        assert_eq!(c.containment, ContainmentMode::ProcessGroup);
        let d = &c.daemons["auto_sync"];
        assert_eq!(
            d.limits.memory_max,
            Some(crate::limits::MemoryMax::Bytes(512 << 20))
        );
        assert_eq!(
            d.limits.cpu_max,
            Some(crate::limits::CpuMax::Quota {
                quota_us: 50_000,
                period_us: 100_000
            })
        );
        assert_eq!(
            d.job_limits.memory_max,
            Some(crate::limits::MemoryMax::Bytes(1 << 30))
        );
        assert_eq!(ok("daemons: {}\n").containment, ContainmentMode::Auto);
        let e = err(
            "containment: cgroups-please\ndaemons:\n  auto_sync:\n    memory_max: lots\n    cpu_max: fast\n",
            &[],
        )
        .to_string();
        assert!(
            e.contains("containment: 'cgroups-please' is not one of auto, process-group"),
            "{e}"
        );
        assert!(
            e.contains("daemons.auto_sync.memory_max: 'lots' is not a memory size"),
            "{e}"
        );
        assert!(
            e.contains("daemons.auto_sync.cpu_max: 'fast' is not a CPU limit"),
            "{e}"
        );
    }

    #[test]
    fn embedded_default_is_valid_and_has_the_catalog() {
        let c = ok(DEFAULT_YAML);
        assert_eq!(c.daemons.len(), 16, "the catalog's fifteen and nats");
        assert!(c.daemons["auto_sync"].enabled);
        assert!(!c.daemons["unified_idle_shutdown"].enabled);
        // The bus: a plain program, off, ready on its monitoring port, and nothing depends on it
        // (the cluster is opt-in; `start --all` must not start it).
        let nats = &c.daemons["nats"];
        assert!(!nats.enabled);
        assert!(!nats.protocol);
        assert_eq!(
            nats.command.as_deref(),
            Some(
                &[
                    "nats-server".to_string(),
                    "-c".into(),
                    "config/nats.conf".into()
                ][..]
            )
        );
        let Some(Ready::Http { url, .. }) = &nats.ready else {
            panic!("nats is ready on its monitoring port: {:?}", nats.ready)
        };
        assert_eq!(
            (url.authority.as_str(), url.path.as_str()),
            ("127.0.0.1:8222", "/healthz")
        );
        assert!(nats.depends_on.is_empty());
        assert!(
            c.daemons
                .values()
                .all(|d| !d.depends_on.contains(&nats.name))
        );
        assert!(c.profiles.values().all(|p| !p.contains(&nats.name)));
        assert!(!deps::with_dependencies(&c.graph(), &c.enabled()).contains("nats"));
        assert_eq!(c.daemons["evaluation"].depends_on, vec!["training_trigger"]);
        assert_eq!(c.profiles.len(), 6);
        assert_eq!(c.http.addr.to_string(), "127.0.0.1:8770");
        assert_eq!(c.http.max_connections, 128);
        assert_eq!(c.logs.max_bytes, 50 * 1024 * 1024);
        assert_eq!(c.logs.max_files, 5);
    }

    #[test]
    fn an_empty_mapping_means_catalog_defaults() {
        let c = ok("daemons:\n");
        assert_eq!(c.daemons.len(), 15);
        assert_eq!(c.daemons["training_trigger"].depends_on.len(), 4);
    }

    #[test]
    fn files_that_are_not_a_yaml_mapping_are_refused() {
        for (text, want) in [
            ("", "no YAML mapping"),
            ("# only a comment\n\n", "no YAML mapping"),
            (&"\0".repeat(4096)[..], "0x00 is not text"),
            ("daemons:\n  auto_sync:\n\x01\n", "0x01 is not text"),
            ("- a\n- b\n", "must be a mapping"),
        ] {
            let e = err(text, &[]).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert_eq!(err("a: 1\n\0", &[]).problems[0].line, Some(2));
    }

    #[test]
    fn daemon_names_are_lower_case_identifiers_and_not_reserved() {
        for bad in [
            "../../../tmp/escaped",
            "a/b",
            "Auto_Sync",
            "has space",
            "1st",
            "master_loop",
            "supervisor",
            "jobs",
            "",
        ] {
            let text = format!("daemons:\n  \"{bad}\":\n    command: [\"true\"]\n");
            let e = err(&text, &[]).to_string();
            assert!(e.contains("daemon name"), "{bad:?}: {e}");
        }
        let long = "x".repeat(catalog::MAX_NAME_LEN + 1);
        let e = err(
            &format!("daemons:\n  {long}:\n    command: [\"true\"]\n"),
            &[],
        );
        assert!(e.to_string().contains("at most"), "{e}");
        ok("daemons:\n  my_daemon_2:\n    command: [\"true\"]\n");
    }

    #[test]
    fn unknown_key_names_file_line_and_key_with_a_hint() {
        let e = err(
            "daemons:\n  auto_sync:\n    enabled: true\n    intervall: 5\n",
            &[],
        );
        let p = &e.problems[0];
        assert_eq!(p.line, Some(4));
        assert_eq!(p.key, "daemons.auto_sync.intervall");
        assert!(p.message.contains("did you mean interval"), "{}", p.message);
        assert!(
            e.to_string()
                .contains("test.yaml:4: daemons.auto_sync.intervall"),
            "{e}"
        );
    }

    #[test]
    fn unknown_daemon_is_refused_with_suggestion() {
        let e = err("daemons:\n  auto_synk:\n    enabled: true\n", &[]);
        assert_eq!(e.problems[0].line, Some(2));
        assert!(e.problems[0].message.contains("auto_sync"), "{e}");
    }

    #[test]
    fn custom_daemon_with_command_is_accepted() {
        let c = ok("daemons:\n  my_thing:\n    command: [\"sleep\", \"100\"]\n");
        let d = &c.daemons["my_thing"];
        assert!(d.enabled && d.is_external() && !d.protocol);
    }

    #[test]
    fn cycle_is_refused_and_named() {
        let e = err(
            "daemons:\n  auto_sync:\n    depends_on: [auto_promotion]\n",
            &[],
        );
        let text = e.to_string();
        assert!(text.contains("dependency cycle"), "{text}");
        assert!(text.contains("auto_sync"), "{text}");
    }

    #[test]
    fn broken_yaml_is_refused_with_a_line() {
        let e = err("daemons:\n  auto_sync:\n    enabled: [true\n  x: 1\n", &[]);
        assert!(e.problems[0].message.starts_with("invalid YAML"), "{e}");
        assert!(e.problems[0].line.is_some(), "{e:?}");
    }

    #[test]
    fn out_of_range_values_are_all_reported() {
        let e = err(
            "logs:\n  max_files: 0\ndaemons:\n  auto_sync:\n    interval: -3\n    restart: sometimes\n",
            &[],
        );
        assert_eq!(e.problems.len(), 3, "{e}");
        assert_eq!(e.problems[0].line, Some(2));
    }

    #[test]
    fn interval_environment_variables_apply_by_category() {
        let env: Vec<(String, String)> = vec![
            ("RINGRIFT_DAEMON_INTERVAL".into(), "30".into()),
            ("RINGRIFT_SYNC_INTERVAL".into(), "7".into()),
            ("RINGRIFT_EPHEMERAL_INTERVAL".into(), "2".into()),
        ];
        let c = parse(DEFAULT_YAML, "x", &env).unwrap();
        assert_eq!(c.daemons["auto_sync"].interval, Duration::from_secs(7));
        assert_eq!(c.daemons["ephemeral_sync"].interval, Duration::from_secs(2));
        assert_eq!(c.daemons["evaluation"].interval, Duration::from_secs(30));
    }

    #[test]
    fn generic_environment_override_wins_and_is_named_in_errors() {
        let env: Vec<(String, String)> = vec![
            ("RINGRIFT_SYNC_INTERVAL".into(), "7".into()),
            ("RINGRIFT_DAEMONS__AUTO_SYNC__INTERVAL".into(), "0.5".into()),
            ("RINGRIFT_HTTP__ADDR".into(), "127.0.0.1:9999".into()),
        ];
        let c = parse(DEFAULT_YAML, "x", &env).unwrap();
        assert_eq!(c.daemons["auto_sync"].interval, Duration::from_millis(500));
        assert_eq!(c.http.addr.port(), 9999);

        let e = err(
            "daemons:\n",
            &[("RINGRIFT_DAEMONS__AUTO_SYNC__GRACE_PERIOD", "forever")],
        );
        assert_eq!(
            e.problems[0].file,
            "environment RINGRIFT_DAEMONS__AUTO_SYNC__GRACE_PERIOD"
        );
    }

    #[test]
    fn http_connection_cap_is_bounded() {
        assert_eq!(
            ok("http:\n  max_connections: 16\n").http.max_connections,
            16
        );
        let e = err("http:\n  max_connections: 0\n", &[]);
        assert_eq!(e.problems[0].key, "http.max_connections");
        assert!(e.problems[0].message.contains("out of range"), "{e}");
        let e = err("daemons:\n", &[("RINGRIFT_HTTP__MAX_CONNECTIONS", "lots")]);
        assert_eq!(
            e.problems[0].file,
            "environment RINGRIFT_HTTP__MAX_CONNECTIONS"
        );
    }

    #[test]
    fn ready_takes_one_form_for_plain_programs_only() {
        let plain = |ready: &str| {
            format!(
                "daemons:\n  p:\n    command: [\"sleep\", \"9\"]\n    ready_timeout: 5\n{ready}"
            )
        };
        let c = ok(&plain("    ready:\n      tcp: \"127.0.0.1:80\"\n"));
        assert!(matches!(c.daemons["p"].ready, Some(Ready::Tcp { .. })));
        assert_eq!(
            ok(&plain("")).daemons["p"].ready,
            Some(Ready::After(crate::readiness::DEFAULT_PLAIN_AFTER))
        );
        assert_eq!(
            ok("daemons:\n  auto_sync: {}\n").daemons["auto_sync"].ready,
            None,
            "workers report"
        );
        for (bad, says) in [
            ("    ready:\n      tcp: x\n", "not host:port"),
            (
                "    ready:\n      after: 1\n      log: up\n",
                "exactly one of",
            ),
            ("    ready:\n      after: 9\n", "shorter than ready_timeout"),
            (
                "    ready:\n      http: \"https://x/\"\n",
                "https is not supported",
            ),
            ("    ready:\n      port: 80\n", "port"),
        ] {
            let e = err(&plain(bad), &[]).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = err(
            "daemons:\n  p:\n    command: [\"x\"]\n    protocol: true\n    ready:\n      after: 1\n",
            &[],
        )
        .to_string();
        assert!(e.contains("reports its own readiness"), "{e}");
    }

    #[test]
    fn durations_accept_units() {
        let c = ok("defaults:\n  grace_period: 250ms\n  backoff_max: 1m30s\n");
        assert_eq!(
            c.daemons["auto_sync"].grace_period,
            Duration::from_millis(250)
        );
        assert_eq!(
            c.daemons["auto_sync"].restart.backoff_max,
            Duration::from_secs(90)
        );
        let e = err("defaults:\n  grace_period: soon\n", &[]);
        assert_eq!(e.problems[0].key, "defaults.grace_period");
    }

    #[test]
    fn defaults_block_applies_and_errors_point_at_it() {
        let e = err(
            "defaults:\n  heartbeat_interval: 5\n  heartbeat_timeout: 2\n",
            &[],
        );
        assert!(
            e.problems
                .iter()
                .all(|p| p.key == "defaults.heartbeat_timeout"),
            "{e}"
        );
    }

    #[test]
    fn a_negative_duration_is_called_negative() {
        for v in ["-1", "\"-2s\""] {
            let e = err(&format!("cluster:\n  lease_ttl: {v}\n"), &[]);
            assert!(
                e.problems.iter().any(|p| p.key == "cluster.lease_ttl"
                    && p.message.starts_with("must not be negative")),
                "{e}"
            );
        }
    }

    #[test]
    fn profile_with_unknown_member_is_refused() {
        let e = err("profiles:\n  mine: [auto_sync, nope_daemon]\n", &[]);
        assert_eq!(e.problems[0].key, "profiles.mine");
    }

    #[test]
    fn env_values_must_be_strings_and_overrides_stay_text() {
        let e = err(
            "daemons:\n  x:\n    command: [sh]\n    env:\n      VER: 1.10\n      OK: \"1.10\"\n",
            &[],
        );
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "daemons.x.env.VER");
        assert_eq!(e.problems[0].line, Some(5));
        let env = vec![(
            "RINGRIFT_DAEMONS__X__ENV__Ver".to_string(),
            "1.10".to_string(),
        )];
        let c = parse("daemons:\n  x:\n    command: [sh]\n", "t.yaml", &env).unwrap();
        assert_eq!(c.daemons["x"].env["Ver"], "1.10", "case and text kept");
    }

    #[test]
    fn settings_are_checked_with_the_workers_types() {
        let e = err(
            "daemons:\n  training_trigger:\n    cooldown: 5m\n    min_samples: lots\n",
            &[(
                "RINGRIFT_DAEMONS__AUTO_PROMOTION__MIN_WIN_RATE_VS_RANDOM",
                "75",
            )],
        );
        let keys: Vec<(&str, &str)> = e
            .problems
            .iter()
            .map(|p| (p.file.as_str(), p.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                (
                    "environment RINGRIFT_DAEMONS__AUTO_PROMOTION__MIN_WIN_RATE_VS_RANDOM",
                    "daemons.auto_promotion.min_win_rate_vs_random"
                ),
                ("test.yaml", "daemons.training_trigger.min_samples"),
            ]
        );
        // An external program under a catalog name reads its settings itself.
        ok("daemons:\n  training_trigger:\n    command: [sh]\n    min_samples: lots\n");
    }

    #[test]
    fn config_keys_must_be_playable_by_the_built_in_jobs() {
        let e = err("pipeline:\n  config_keys: [square8_2p]\n", &[]);
        assert!(e.problems[0].message.contains("cannot be played"), "{e}");
        // With jobs of one's own, any well-formed key.
        let own = "pipeline:\n  config_keys: [square8_2p]\n  jobs:\n";
        let jobs: String = JOB_KINDS
            .iter()
            .map(|k| format!("    {k}:\n      command: [\"my-{k}\", \"{{config_key}}\"]\n"))
            .collect();
        ok(&format!("{own}{jobs}"));
    }

    #[test]
    fn placeholders_per_kind_are_the_single_table() {
        // Every placeholder is given to some kind, and every kind's are known.
        let mut union: Vec<&str> = COMMON_PLACEHOLDERS.to_vec();
        for (kind, own) in JOB_PLACEHOLDERS {
            assert!(JOB_KINDS.contains(kind), "{kind}");
            union.extend(own.iter().copied());
        }
        union.sort_unstable();
        union.dedup();
        let mut all = PLACEHOLDERS.to_vec();
        all.sort_unstable();
        assert_eq!(union, all);
        assert_eq!(JOB_PLACEHOLDERS.len(), JOB_KINDS.len());
        // The embedded default uses only what each kind is given.
        for (kind, t) in &PipelineConfig::default().jobs {
            for word in &t.command {
                for p in placeholders(word) {
                    assert!(job_placeholders(kind).contains(&p.as_str()), "{kind}: {p}");
                }
            }
        }
    }

    #[test]
    fn a_placeholder_a_kind_is_not_given_is_refused_naming_what_it_gets() {
        let e = err(
            "pipeline:\n  jobs:\n    train:\n      command: [\"python3\", \"t.py\", \"{seed}\"]\n",
            &[],
        );
        let p = &e.problems[0];
        assert_eq!(p.key, "pipeline.jobs.train.command");
        assert_eq!(
            p.message,
            "{seed} is not given to train jobs; a train job gets {worker} {root} {config_key} \
             {board_type} {num_players} {db_path} {npz_path} {model_path} {candidate_path} \
             {epochs} {learning_rate}"
        );
        // Unknown ones keep their own message.
        let e = err(
            "pipeline:\n  jobs:\n    train:\n      command: [\"python3\", \"{sed}\"]\n",
            &[],
        );
        assert!(
            e.problems[0]
                .message
                .starts_with("unknown placeholder {sed}"),
            "{e}"
        );
    }

    #[test]
    fn validate_and_stuck_after_are_optional_job_settings() {
        let c = ok(
            "pipeline:\n  jobs:\n    validate:\n      command: [\"python3\", \"v.py\", \"{candidate_path}\"]\n    train:\n      stuck_after: off\n    gauntlet:\n      stuck_after: 2h\n",
        );
        let v = &c.pipeline.jobs["validate"];
        assert_eq!(v.max_runtime, Duration::from_secs(300));
        assert_eq!(v.stuck_after, None);
        assert_eq!(c.pipeline.jobs["train"].stuck_after, Some(Duration::ZERO));
        assert_eq!(
            c.pipeline.jobs["gauntlet"].stuck_after,
            Some(Duration::from_secs(7200))
        );
        assert!(!ok("daemons:\n").pipeline.jobs.contains_key("validate"));
        let e = err(
            "pipeline:\n  jobs:\n    validate:\n      max_runtime: 10\n",
            &[],
        );
        assert_eq!(e.problems[0].message, "a validate job needs a command");
        let e = err(
            "pipeline:\n  jobs:\n    validate:\n      command: [\"v\", \"{games}\"]\n",
            &[],
        );
        assert!(
            e.problems[0]
                .message
                .starts_with("{games} is not given to validate jobs"),
            "{e}"
        );
        let e = err(
            "pipeline:\n  jobs:\n    train:\n      stuck_after: never\n",
            &[],
        );
        assert_eq!(e.problems[0].key, "pipeline.jobs.train.stuck_after");
    }

    #[test]
    fn a_template_fingerprint_follows_its_command_and_runtime() {
        let mut t = PipelineConfig::default().jobs["train"].clone();
        let a = t.fingerprint();
        assert_eq!(a.len(), 16);
        assert_eq!(a, PipelineConfig::default().jobs["train"].fingerprint());
        t.max_runtime = Duration::from_secs(7200);
        assert_ne!(t.fingerprint(), a);
        let b = job_fingerprint(&["ab".into(), "c".into()], 1.0);
        assert_ne!(b, job_fingerprint(&["a".into(), "bc".into()], 1.0));
    }

    #[test]
    fn programs_are_found_on_path_or_as_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_program("sh", dir.path(), std::env::var("PATH").ok().as_deref()).is_ok());
        let e = find_program("no-such-rr", dir.path(), Some("/nonexistent")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "program \"no-such-rr\" is not found on PATH (or not executable); give its full path"
        );
        std::fs::write(dir.path().join("tool"), "").unwrap();
        let e = find_program("./tool", dir.path(), None).unwrap_err();
        assert_eq!(e.to_string(), "program \"./tool\" is not executable");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let e = find_program("./sub", dir.path(), None).unwrap_err();
        assert_eq!(e.to_string(), "program \"./sub\" is not a file");
        let e = find_program("./gone", dir.path(), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("program \"./gone\" cannot be run: No such file"),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            find_program("", dir.path(), None).unwrap_err().to_string(),
            "the program name is empty"
        );
    }

    #[test]
    fn programs_of_daemons_start_all_would_not_start_are_only_notes() {
        let dir = tempfile::tempdir().unwrap();
        let env = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
            [("PATH", "/nonexistent")]
                .iter()
                .chain(extra)
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let text = "daemons:\n\
                    \x20 off:\n    enabled: false\n    command: [\"no-such-off-rr\"]\n\
                    \x20 dep:\n    enabled: false\n    command: [\"no-such-dep-rr\"]\n\
                    \x20 on:\n    command: [\"no-such-on-rr\"]\n    depends_on: [dep]\n";
        let (_, missing) = parse_in(text, "t.yaml", &env(&[]), dir.path()).unwrap();
        let keys = |ps: &[Problem]| ps.iter().map(|p| p.key.clone()).collect::<Vec<_>>();
        // `dep` is disabled, but `start --all` starts it with `on`, which depends on it.
        assert_eq!(
            keys(&missing.needed),
            ["daemons.dep.command", "daemons.on.command"]
        );
        assert_eq!(keys(&missing.disabled), ["daemons.off.command"]);
        assert!(
            missing.disabled[0]
                .message
                .contains("off is disabled: needed only once it is enabled"),
            "{}",
            missing.disabled[0]
        );

        // The embedded default's `nats` entry: a note while disabled, needed once enabled.
        let (c, missing) = parse_in(DEFAULT_YAML, "d", &env(&[]), dir.path()).unwrap();
        assert!(missing.needed.is_empty(), "{:?}", missing.needed);
        assert_eq!(keys(&missing.disabled), ["daemons.nats.command"]);
        assert!(!c.enabled().contains("nats"));
        let on = [("RINGRIFT_DAEMONS__NATS__ENABLED", "true")];
        let (_, missing) = parse_in(DEFAULT_YAML, "d", &env(&on), dir.path()).unwrap();
        assert_eq!(keys(&missing.needed), ["daemons.nats.command"]);
        assert!(missing.disabled.is_empty());
    }

    #[test]
    fn resolve_accepts_any_case_and_suggests() {
        let c = ok("daemons:\n");
        assert_eq!(c.resolve("AUTO_SYNC").unwrap(), "auto_sync");
        let e = c.resolve("auto_synk").unwrap_err();
        assert_eq!(e.name, "auto_synk");
        assert!(
            e.to_string().starts_with("unknown daemon 'auto_synk': "),
            "{e}"
        );
        assert!(e.to_string().contains("did you mean auto_sync"), "{e}");
    }

    #[test]
    fn locate_walks_nested_blocks() {
        let t = "a:\n  b:\n    c: 1\n  d: 2\ne:\n  c: 3\n";
        assert_eq!(locate(t, &["a", "b", "c"]), Some(3));
        assert_eq!(locate(t, &["e", "c"]), Some(6));
        assert_eq!(locate(t, &["a", "d"]), Some(4));
    }
}
