//! The typed event catalog: every event type the pipeline's daemons exchange, with the schema of
//! its JSON payload.
//!
//! The system this replaces lost events silently because a producer wrote `config` where consumers
//! read `config_key`. Here a payload is checked against its type's schema before it is accepted: a
//! missing field, a field of the wrong type, or a field the schema does not know is refused with a
//! message naming the field.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config_key::{self, ConfigKeyError};

/// Largest accepted payload, serialized as compact JSON: 64 KiB.
///
/// Events are facts ("a model was promoted, here is its path"), not a way to move data: anything
/// bigger belongs in a file whose path the event names. The bound keeps every line of the event
/// log small, which keeps the router's reads (it reads bodies from disk on demand), pages of
/// queries and frames to subscribers small too.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// An event as stored in the event log and delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log: strictly increasing, never reused within a root.
    pub seq: u64,
    /// Unique id, for consumers to drop duplicates (delivery is at-least-once).
    pub id: String,
    /// Its type, as in the catalog (`NEW_GAMES_AVAILABLE`); `type` in JSON.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Its JSON object, valid against the type's schema.
    pub payload: Value,
    /// Who emitted it: a daemon name, "supervisor", "cli" or "http".
    pub source: String,
    /// RFC 3339 UTC time of acceptance.
    pub timestamp: String,
    /// For an event from another node of the cluster: that node's id (its `seq` is this node's,
    /// its `id` the one it was given there). Absent for this node's own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For an event of a cluster-scoped daemon: the lease it acted under and that lease's
    /// fencing token when it was emitted. A node that has seen a higher token for the lease
    /// refuses it (a leader that lost its lease cannot act on what its successor decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
}

/// A fencing token on an event (Kleppmann, "How to do distributed locking", 2016): the lease's
/// name and its revision in the lease bucket, which only grows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The lease: a cluster-scoped daemon's name, or `<daemon>.<config key>`.
    pub lease: String,
    /// Its revision when the event was emitted.
    pub token: u64,
}

/// The event types that cross the cluster (README, "Cluster"): facts of the loop that other nodes
/// act on or show. Lifecycle (DAEMON_*) and membership (NODE_*) events stay on their node: each
/// node announces membership itself.
pub const CLUSTER_WIDE: &[&str] = &[
    "NEW_GAMES_AVAILABLE",
    "SELFPLAY_COMPLETE",
    "NPZ_EXPORT_COMPLETE",
    "TRAINING_COMPLETED",
    "TRAINING_FAILED",
    "EVALUATION_COMPLETED",
    "EVALUATION_FAILED",
    "MODEL_PROMOTED",
    "PROMOTION_REJECTED",
    "MODEL_DISTRIBUTION_COMPLETE",
    "QUALITY_SCORE_UPDATED",
    "WORK_FAILED",
];

/// True for a (normalized) type in [`CLUSTER_WIDE`].
pub fn is_cluster_wide(event_type: &str) -> bool {
    CLUSTER_WIDE.contains(&event_type)
}

impl Origin<'_> {
    /// The origin an event's `source` names (the inverse of [`Origin::as_str`]).
    pub fn from_source(source: &str) -> Origin<'_> {
        match source {
            "supervisor" => Origin::Supervisor,
            "cli" => Origin::Cli,
            "http" => Origin::Http,
            daemon => Origin::Daemon(daemon),
        }
    }
}

/// The JSON type a payload field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// A string.
    Str,
    /// An integer (JSON number without a fraction).
    Int,
    /// Any JSON number.
    Number,
    /// true or false.
    Bool,
    /// A [`crate::config_key::ConfigKey`]: `<board>_<players>p`, board
    /// hex8|hex6|square8|square19|hexagonal, 2–4 players.
    ConfigKey,
    /// A JSON object.
    Object,
}

/// One field of an event type's payload schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The field's key in the payload.
    pub name: &'static str,
    /// Its JSON type.
    pub ty: FieldType,
    /// A payload without it is refused.
    pub required: bool,
    /// May be JSON null.
    pub nullable: bool,
}

/// One event type of the catalog: its name, what it means, who may emit it and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSpec {
    /// The type's name (`NEW_GAMES_AVAILABLE`).
    pub name: &'static str,
    /// What the event means, for `events --types` and the docs.
    pub description: &'static str,
    /// Who may emit it; checked by the supervisor against the origin it stamps itself.
    pub emitters: Emitters,
    /// The payload's fields; fields not listed are refused.
    pub fields: &'static [Field],
}

/// Who may emit an event type. Consumers act on events, so an event is only as trustworthy as
/// the rule that let it in: a step's result comes from the daemon that runs that step, a
/// lifecycle fact from the supervisor that observed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitters {
    /// Lifecycle facts (DAEMON_*): the supervisor only.
    Supervisor,
    /// A pipeline step's facts: only the catalog daemons named (whatever program runs under that
    /// name, so a `command:` of the user's own can take a step's place).
    Owners(&'static [&'static str]),
    /// Facts that may come from outside the built-in loop (games from the user's own selfplay, a
    /// sync run by hand): the daemons named, daemons of the user's own (names outside the
    /// catalog), and the operator (`emit` on the control socket, `POST /event` with the token).
    Open(&'static [&'static str]),
}

/// Where an event came from, as the supervisor establishes it (never as the sender claims it).
/// Its string form is the event's `source` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// The supervisor itself (lifecycle announcements).
    Supervisor,
    /// `ringrift-supervisor emit` over the control socket (the supervisor's user).
    Cli,
    /// `POST /event` with the bearer token.
    Http,
    /// A daemon, identified by the connection the supervisor handed it at spawn.
    Daemon(&'a str),
}

impl Origin<'_> {
    /// The event's `source` field: "supervisor", "cli", "http" or the daemon's name (daemon names
    /// cannot take the first three: see `catalog::RESERVED_NAMES`).
    pub fn as_str(&self) -> &str {
        match self {
            Origin::Supervisor => "supervisor",
            Origin::Cli => "cli",
            Origin::Http => "http",
            Origin::Daemon(name) => name,
        }
    }
}

/// Checks that `origin` may emit events of `spec`'s type (see [`Emitters`]). The error says who may.
pub fn may_emit(spec: &EventSpec, origin: Origin<'_>) -> Result<(), InvalidEvent> {
    let allowed = match (spec.emitters, origin) {
        (_, Origin::Supervisor) => true,
        (Emitters::Supervisor, _) => false,
        (Emitters::Owners(owners) | Emitters::Open(owners), Origin::Daemon(d))
            if owners.contains(&d) =>
        {
            true
        }
        (Emitters::Open(_), Origin::Cli | Origin::Http) => true,
        (Emitters::Open(_), Origin::Daemon(d)) => crate::catalog::find(d).is_none(),
        (Emitters::Owners(_), _) => false,
    };
    if allowed {
        return Ok(());
    }
    let who = match spec.emitters {
        Emitters::Supervisor => "only the supervisor".to_string(),
        Emitters::Owners(o) => format!("only {}", o.join(", ")),
        Emitters::Open(o) => format!(
            "{}, daemons of your own and the operator (cli, http)",
            o.join(", ")
        ),
    };
    Err(InvalidEvent(format!(
        "{} may not emit {}: {who} may",
        origin.as_str(),
        spec.name
    )))
}

const fn req(name: &'static str, ty: FieldType) -> Field {
    Field {
        name,
        ty,
        required: true,
        nullable: false,
    }
}
const fn opt(name: &'static str, ty: FieldType) -> Field {
    Field {
        name,
        ty,
        required: false,
        nullable: true,
    }
}

use FieldType::*;

const CK: Field = req("config_key", ConfigKey);
const CK_OPT: Field = opt("config_key", ConfigKey);

/// Every event type, with its payload schema.
pub const EVENTS: &[EventSpec] = &[
    EventSpec {
        name: "NEW_GAMES_AVAILABLE",
        description: "selfplay wrote new completed games",
        emitters: Emitters::Open(&["selfplay_scheduler", "idle_resource", "cluster_data_sync"]),
        fields: &[
            CK,
            req("new_games", Int),
            opt("total_games", Int),
            opt("db_path", Str),
        ],
    },
    EventSpec {
        name: "SELFPLAY_COMPLETE",
        description: "a selfplay job finished",
        emitters: Emitters::Open(&["selfplay_scheduler", "idle_resource"]),
        fields: &[
            CK,
            req("games", Int),
            opt("job_id", Str),
            opt("duration_secs", Number),
        ],
    },
    EventSpec {
        name: "DATA_SYNC_COMPLETED",
        description: "a sync pass copied data",
        emitters: Emitters::Open(&["auto_sync", "ephemeral_sync", "cluster_data_sync"]),
        fields: &[
            CK_OPT,
            opt("source", Str),
            opt("target", Str),
            opt("files", Int),
            opt("bytes", Int),
        ],
    },
    EventSpec {
        name: "DATA_SYNC_FAILED",
        description: "a sync pass failed",
        emitters: Emitters::Open(&["auto_sync", "ephemeral_sync", "cluster_data_sync"]),
        fields: &[
            CK_OPT,
            req("error", Str),
            opt("source", Str),
            opt("target", Str),
        ],
    },
    EventSpec {
        name: "NPZ_EXPORT_STARTED",
        description: "export of games to a training file began",
        emitters: Emitters::Owners(&["auto_export"]),
        fields: &[CK, opt("games", Int), opt("job_id", Str)],
    },
    EventSpec {
        name: "NPZ_EXPORT_COMPLETE",
        description: "a training file (NPZ) is ready",
        emitters: Emitters::Owners(&["auto_export"]),
        fields: &[
            CK,
            req("npz_path", Str),
            req("samples", Int),
            opt("games", Int),
            opt("last_game_id", Int),
            // Game rows left out because they break the schema's meaning (a winner who is not a
            // player, moves out of range, a stored winner the moves contradict).
            opt("skipped_rows", Int),
        ],
    },
    EventSpec {
        name: "GAMES_DB_QUARANTINED",
        description: "a games DB that SQLite cannot open, or that fails its integrity or schema \
                      check, was moved aside; a fresh one is started",
        emitters: Emitters::Owners(&["selfplay_scheduler", "idle_resource", "auto_export"]),
        fields: &[
            CK,
            req("db_path", Str),
            req("moved_to", Str),
            req("error", Str),
        ],
    },
    EventSpec {
        name: "TRAINING_STARTED",
        description: "a training run began",
        emitters: Emitters::Owners(&["training_trigger"]),
        fields: &[CK, opt("npz_path", Str), opt("job_id", Str)],
    },
    EventSpec {
        name: "TRAINING_COMPLETED",
        description: "a training run produced a candidate model",
        emitters: Emitters::Owners(&["training_trigger"]),
        fields: &[
            CK,
            req("model_path", Str),
            opt("samples", Int),
            opt("loss", Number),
            opt("job_id", Str),
        ],
    },
    EventSpec {
        name: "TRAINING_FAILED",
        description: "a training run failed",
        emitters: Emitters::Owners(&["training_trigger"]),
        fields: &[CK, req("error", Str), opt("job_id", Str)],
    },
    EventSpec {
        name: "EVALUATION_COMPLETED",
        description: "a candidate finished its gauntlet",
        emitters: Emitters::Owners(&["evaluation"]),
        fields: &[
            CK,
            req("model_path", Str),
            req("win_rate_vs_random", Number),
            opt("win_rate_vs_baseline", Number),
            req("games", Int),
            opt("results_path", Str),
            // In a cluster, when the candidate is another node's: that node (the paths are its).
            opt("candidate_node", Str),
        ],
    },
    EventSpec {
        name: "EVALUATION_FAILED",
        description: "a gauntlet could not be run",
        emitters: Emitters::Owners(&["evaluation"]),
        fields: &[CK, opt("model_path", Str), req("error", Str)],
    },
    EventSpec {
        name: "MODEL_PROMOTED",
        description: "a candidate became the canonical model",
        emitters: Emitters::Owners(&["auto_promotion"]),
        fields: &[
            CK,
            req("model_path", Str),
            opt("previous_model", Str),
            opt("win_rate_vs_baseline", Number),
            opt("win_rate_vs_random", Number),
            // The promotion record in data/ratings.db: the key's generation count, and the
            // promoted model's Elo on the key's ladder (random play 0).
            opt("generation", Number),
            opt("rating_elo", Number),
        ],
    },
    EventSpec {
        name: "PROMOTION_REJECTED",
        description: "a candidate failed a promotion gate",
        emitters: Emitters::Owners(&["auto_promotion"]),
        fields: &[
            CK,
            req("model_path", Str),
            req("gate", Str),
            req("value", Number),
            req("threshold", Number),
            opt("reason", Str),
        ],
    },
    EventSpec {
        name: "MODEL_DISTRIBUTION_COMPLETE",
        description: "canonical models were copied to their targets",
        emitters: Emitters::Owners(&["model_distribution"]),
        fields: &[
            CK_OPT,
            req("targets", Int),
            opt("model_path", Str),
            opt("failed", Int),
        ],
    },
    EventSpec {
        name: "QUALITY_SCORE_UPDATED",
        description: "the data quality score of a config key changed",
        emitters: Emitters::Owners(&["quality_monitor"]),
        fields: &[CK, req("score", Number), opt("games", Int)],
    },
    EventSpec {
        name: "LOW_QUALITY_DATA_WARNING",
        description: "data quality fell under its threshold",
        emitters: Emitters::Owners(&["quality_monitor"]),
        fields: &[
            CK,
            req("score", Number),
            req("threshold", Number),
            opt("reason", Str),
        ],
    },
    EventSpec {
        name: "IDLE_RESOURCE_DETECTED",
        description: "the node has been idle long enough to run extra selfplay",
        emitters: Emitters::Owners(&["idle_resource"]),
        fields: &[
            req("cpu_percent", Number),
            opt("gpu_percent", Number),
            opt("jobs_started", Int),
        ],
    },
    EventSpec {
        name: "BACKPRESSURE_ACTIVATED",
        description: "a bounded queue filled up",
        emitters: Emitters::Owners(&["evaluation"]),
        fields: &[req("queue", Str), req("depth", Int), req("limit", Int)],
    },
    EventSpec {
        name: "BACKPRESSURE_RELEASED",
        description: "a bounded queue drained again",
        emitters: Emitters::Owners(&["evaluation"]),
        fields: &[req("queue", Str), req("depth", Int), req("limit", Int)],
    },
    EventSpec {
        name: "BACKOFF_RESET",
        description: "the operator reset a config key's failure backoff (`pipeline reset-backoff`): \
                      training_trigger and auto_export look at the key again at once",
        emitters: Emitters::Open(&[]),
        fields: &[CK],
    },
    EventSpec {
        name: "WORK_FAILED",
        description: "a work item failed its last attempt and was set aside (dead-letter)",
        emitters: Emitters::Owners(&[
            "selfplay_scheduler",
            "training_trigger",
            "evaluation",
            "idle_resource",
        ]),
        fields: &[
            req("item_id", Int),
            req("item_type", Str),
            CK,
            opt("node", Str),
            req("error", Str),
            req("attempts", Int),
        ],
    },
    EventSpec {
        name: "WORK_QUEUED",
        description: "work items were added to an empty work queue (selfplay_scheduler wakes up)",
        emitters: Emitters::Owners(&["queue_populator"]),
        fields: &[req("added", Int), req("pending", Int)],
    },
    EventSpec {
        name: "JOB_REAPED",
        description: "JOB_REAPER stopped a process",
        emitters: Emitters::Owners(&["job_reaper"]),
        fields: &[
            req("pid", Int),
            req("reason", Str),
            req("command", Str),
            req("age_secs", Number),
            opt("job_id", Str),
            opt("dry_run", Bool),
        ],
    },
    EventSpec {
        name: "DAEMON_STARTED",
        description: "a daemon is RUNNING",
        emitters: Emitters::Supervisor,
        fields: &[req("daemon", Str), req("pid", Int)],
    },
    EventSpec {
        name: "DAEMON_STOPPED",
        description: "a daemon stopped",
        emitters: Emitters::Supervisor,
        fields: &[
            req("daemon", Str),
            opt("last_exit", Str),
            opt("reason", Str),
        ],
    },
    EventSpec {
        name: "DAEMON_FAILED",
        description: "a daemon exhausted its restart budget",
        emitters: Emitters::Supervisor,
        fields: &[req("daemon", Str), req("reason", Str)],
    },
    EventSpec {
        name: "NODE_JOINED",
        description: "a node of the cluster appeared (its record in the membership bucket)",
        emitters: Emitters::Supervisor,
        fields: &[req("node_id", Str), opt("roles", Str), opt("version", Str)],
    },
    EventSpec {
        name: "NODE_LEFT",
        description: "a node of the cluster stopped renewing its record, which expired",
        emitters: Emitters::Supervisor,
        fields: &[req("node_id", Str), opt("last_seen_secs", Number)],
    },
    EventSpec {
        name: "NODE_HEALTH_CHANGED",
        description: "the node's health changed",
        emitters: Emitters::Owners(&["unified_node_health"]),
        fields: &[
            req("healthy", Bool),
            opt("message", Str),
            opt("details", Object),
        ],
    },
];

/// The catalog entry of a (normalized) event type.
pub fn find(name: &str) -> Option<&'static EventSpec> {
    EVENTS.iter().find(|e| e.name == name)
}

/// Event type names are accepted in either case; this is the canonical (upper) form.
pub fn normalize(name: &str) -> String {
    name.trim().to_ascii_uppercase().replace('-', "_")
}

/// Why an event is refused: its type is unknown or its payload does not match the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvent(pub String);

/// Checks an event type and its payload against the catalog. Returns the canonical type name.
pub fn validate(event_type: &str, payload: &Value) -> Result<String, InvalidEvent> {
    let name = normalize(event_type);
    let Some(spec) = find(&name) else {
        let lower: Vec<String> = EVENTS.iter().map(|e| e.name.to_ascii_lowercase()).collect();
        let close = crate::catalog::closest(&name, lower.iter().map(String::as_str));
        let hint = if close.is_empty() {
            format!(
                "known types: {}",
                EVENTS.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
            )
        } else {
            format!(
                "did you mean {}?",
                close
                    .iter()
                    .map(|s| s.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(InvalidEvent(format!(
            "unknown event type '{event_type}': {hint}"
        )));
    };
    let Value::Object(map) = payload else {
        return Err(InvalidEvent(format!(
            "{name}: the payload must be a JSON object"
        )));
    };
    if let Err(size) = payload_size(payload) {
        return Err(InvalidEvent(format!(
            "{name}: the payload is {size} bytes, more than the limit of {MAX_PAYLOAD_BYTES} bytes \
             (events carry facts; put bulk data in a file and name its path)"
        )));
    }
    let mut problems = Vec::new();
    for key in map.keys() {
        if !spec.fields.iter().any(|f| f.name == key) {
            let names: Vec<&str> = spec.fields.iter().map(|f| f.name).collect();
            let close = crate::catalog::closest(key, names.iter().copied());
            let hint = match close.first() {
                Some(c) => format!(" (did you mean '{c}'?)"),
                None => format!(" (fields: {})", names.join(", ")),
            };
            problems.push(format!("unknown field '{key}'{hint}"));
        }
    }
    for f in spec.fields {
        match map.get(f.name) {
            None if f.required => {
                problems.push(format!("missing field '{}' ({})", f.name, type_name(f.ty)))
            }
            None => {}
            Some(Value::Null) if f.nullable => {}
            Some(v) => {
                if let Err(e) = check(f.ty, v) {
                    problems.push(format!("field '{}' {e}", f.name));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(name)
    } else {
        Err(InvalidEvent(format!("{name}: {}", problems.join("; "))))
    }
}

/// The payload's size as compact JSON, or `Err(size)` once it is known to pass
/// [`MAX_PAYLOAD_BYTES`]. Counts without allocating, and stops counting soon after the limit.
fn payload_size(payload: &Value) -> Result<usize, usize> {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            if self.0 > MAX_PAYLOAD_BYTES {
                return Err(std::io::Error::other("too large"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    match serde_json::to_writer(&mut c, payload) {
        Ok(()) => Ok(c.0),
        // The exact size of a huge payload is worth one more pass: the message names it.
        Err(_) => Err(serde_json::to_vec(payload).map(|v| v.len()).unwrap_or(c.0)),
    }
}

fn type_name(ty: FieldType) -> &'static str {
    match ty {
        Str => "a string",
        Int => "an integer",
        Number => "a number",
        Bool => "true or false",
        ConfigKey => "a config key like \"hex8_2p\"",
        Object => "an object",
    }
}

/// Why a field's value does not fit its type; the message follows "field '<name>' ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum FieldError {
    #[error("must be {}", type_name(*.0))]
    WrongType(FieldType),
    #[error(transparent)]
    ConfigKey(#[from] ConfigKeyError),
}

fn check(ty: FieldType, v: &Value) -> Result<(), FieldError> {
    let ok = match ty {
        Str => v.is_string(),
        Int => v.is_i64() || v.is_u64(),
        Number => v.is_number(),
        Bool => v.is_boolean(),
        Object => v.is_object(),
        ConfigKey => {
            return match v.as_str() {
                Some(s) => s
                    .parse::<config_key::ConfigKey>()
                    .map(drop)
                    .map_err(Into::into),
                None => Err(FieldError::WrongType(ty)),
            };
        }
    };
    if ok {
        Ok(())
    } else {
        Err(FieldError::WrongType(ty))
    }
}

/// A payload builder for code that emits events: `payload([("config_key", "hex8_2p".into())])`.
pub fn payload<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Map<String, Value>>(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_oversized_payload_is_refused_with_its_size_and_the_limit() {
        let fits =
            json!({"config_key": "hex8_2p", "model_path": "m".repeat(MAX_PAYLOAD_BYTES - 100)});
        assert!(validate("TRAINING_COMPLETED", &fits).is_ok());
        let big = json!({"config_key": "hex8_2p", "model_path": "m".repeat(MAX_PAYLOAD_BYTES)});
        let size = serde_json::to_vec(&big).unwrap().len();
        let e = validate("TRAINING_COMPLETED", &big).unwrap_err().0;
        assert!(
            e.contains(&format!("the payload is {size} bytes"))
                && e.contains(&format!("limit of {MAX_PAYLOAD_BYTES} bytes")),
            "{e}"
        );
    }

    #[test]
    fn who_may_emit_follows_the_owner_of_each_step() {
        let spec = |n| find(n).unwrap();
        let ok = |n, o| may_emit(spec(n), o).is_ok();
        // Lifecycle: the supervisor only.
        assert!(ok("DAEMON_FAILED", Origin::Supervisor));
        for o in [
            Origin::Cli,
            Origin::Http,
            Origin::Daemon("auto_sync"),
            Origin::Daemon("mine"),
        ] {
            assert!(!ok("DAEMON_FAILED", o), "{o:?}");
        }
        // A step's result: its owner only, not the operator, another catalog daemon or a stranger.
        assert!(ok("EVALUATION_COMPLETED", Origin::Daemon("evaluation")));
        for o in [
            Origin::Cli,
            Origin::Http,
            Origin::Daemon("auto_promotion"),
            Origin::Daemon("mine"),
        ] {
            assert!(!ok("EVALUATION_COMPLETED", o), "{o:?}");
        }
        assert!(!ok("LOW_QUALITY_DATA_WARNING", Origin::Http));
        // Input facts: their owners, the operator and daemons of the user's own; not other catalog daemons.
        for o in [
            Origin::Cli,
            Origin::Http,
            Origin::Daemon("mine"),
            Origin::Daemon("selfplay_scheduler"),
        ] {
            assert!(ok("NEW_GAMES_AVAILABLE", o), "{o:?}");
        }
        assert!(!ok("NEW_GAMES_AVAILABLE", Origin::Daemon("auto_promotion")));
        let e = may_emit(spec("EVALUATION_COMPLETED"), Origin::Http).unwrap_err();
        assert_eq!(
            e.0,
            "http may not emit EVALUATION_COMPLETED: only evaluation may"
        );
        // Every owner named is a catalog daemon.
        for e in EVENTS {
            if let Emitters::Owners(o) | Emitters::Open(o) = e.emitters {
                for d in o {
                    assert!(crate::catalog::find(d).is_some(), "{}: {d}", e.name);
                }
            }
        }
    }

    #[test]
    fn the_catalog_has_every_type_the_pipeline_needs() {
        for name in [
            "NEW_GAMES_AVAILABLE",
            "SELFPLAY_COMPLETE",
            "DATA_SYNC_COMPLETED",
            "DATA_SYNC_FAILED",
            "NPZ_EXPORT_STARTED",
            "NPZ_EXPORT_COMPLETE",
            "GAMES_DB_QUARANTINED",
            "TRAINING_STARTED",
            "TRAINING_COMPLETED",
            "TRAINING_FAILED",
            "EVALUATION_COMPLETED",
            "EVALUATION_FAILED",
            "MODEL_PROMOTED",
            "PROMOTION_REJECTED",
            "MODEL_DISTRIBUTION_COMPLETE",
            "QUALITY_SCORE_UPDATED",
            "LOW_QUALITY_DATA_WARNING",
            "IDLE_RESOURCE_DETECTED",
            "BACKPRESSURE_ACTIVATED",
            "BACKPRESSURE_RELEASED",
            "JOB_REAPED",
            "DAEMON_STARTED",
            "DAEMON_STOPPED",
            "DAEMON_FAILED",
            "NODE_JOINED",
            "NODE_LEFT",
            "NODE_HEALTH_CHANGED",
        ] {
            assert!(find(name).is_some(), "{name}");
        }
    }

    #[test]
    fn a_valid_payload_passes_and_the_type_is_normalized() {
        let t = validate(
            "new_games_available",
            &json!({"config_key": "hex8_2p", "new_games": 12}),
        )
        .unwrap();
        assert_eq!(t, "NEW_GAMES_AVAILABLE");
    }

    #[test]
    fn the_misnamed_config_field_is_named_in_the_error() {
        let e = validate("TRAINING_STARTED", &json!({"config": "hex8_2p"}))
            .unwrap_err()
            .0;
        assert!(
            e.contains("unknown field 'config' (did you mean 'config_key'?)"),
            "{e}"
        );
        assert!(e.contains("missing field 'config_key'"), "{e}");
    }

    #[test]
    fn wrong_types_and_bad_config_keys_are_refused() {
        let e = validate(
            "NEW_GAMES_AVAILABLE",
            &json!({"config_key": "hex8_2p", "new_games": "many"}),
        )
        .unwrap_err()
        .0;
        assert!(e.contains("field 'new_games' must be an integer"), "{e}");
        let e = validate(
            "NEW_GAMES_AVAILABLE",
            &json!({"config_key": "chess_2p", "new_games": 1}),
        )
        .unwrap_err()
        .0;
        assert!(e.contains("'chess_2p' is not a config key"), "{e}");
        assert!(validate("NEW_GAMES_AVAILABLE", &json!([1, 2])).is_err());
    }

    #[test]
    fn unknown_types_get_a_suggestion() {
        let e = validate("TRAINING_STARTD", &json!({})).unwrap_err().0;
        assert!(e.contains("did you mean TRAINING_STARTED"), "{e}");
    }

    #[test]
    fn optional_fields_may_be_null_or_absent() {
        validate("EVALUATION_COMPLETED", &json!({"config_key": "hex8_2p", "model_path": "m", "win_rate_vs_random": 0.8, "win_rate_vs_baseline": null, "games": 10})).unwrap();
        validate("DATA_SYNC_COMPLETED", &json!({})).unwrap();
    }

    #[test]
    fn config_key_fields_take_every_board_and_2_to_4_players() {
        for key in ["hex8_2p", "square19_4p", "hexagonal_3p"] {
            validate("TRAINING_STARTED", &json!({ "config_key": key })).unwrap();
        }
        for key in ["hex8_5p", "hex8"] {
            let e = validate("TRAINING_STARTED", &json!({ "config_key": key }))
                .unwrap_err()
                .0;
            assert!(
                e.contains(&format!("field 'config_key' '{key}' is not a config key")),
                "{e}"
            );
        }
    }
}
