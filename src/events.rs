//! The typed event catalog: every event type the pipeline's daemons exchange, with the schema of
//! its JSON payload.
//!
//! The system this replaces lost events silently because a producer wrote `config` where consumers
//! read `config_key`. Here a payload is checked against its type's schema before it is accepted: a
//! missing field, a field of the wrong type, or a field the schema does not know is refused with a
//! message naming the field.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: Value,
    /// Who emitted it: a daemon name, "supervisor", "cli" or "http".
    pub source: String,
    /// RFC 3339 UTC time of acceptance.
    pub timestamp: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Str,
    Int,
    Number,
    Bool,
    /// "<board>_<players>p": board hex8|hex6|square8|square19|hexagonal, 2–4 players.
    ConfigKey,
    Object,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub ty: FieldType,
    pub required: bool,
    /// May be JSON null.
    pub nullable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub fields: &'static [Field],
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
        fields: &[CK, opt("games", Int), opt("job_id", Str)],
    },
    EventSpec {
        name: "NPZ_EXPORT_COMPLETE",
        description: "a training file (NPZ) is ready",
        fields: &[
            CK,
            req("npz_path", Str),
            req("samples", Int),
            opt("games", Int),
            opt("last_game_id", Int),
        ],
    },
    EventSpec {
        name: "TRAINING_STARTED",
        description: "a training run began",
        fields: &[CK, opt("npz_path", Str), opt("job_id", Str)],
    },
    EventSpec {
        name: "TRAINING_COMPLETED",
        description: "a training run produced a candidate model",
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
        fields: &[CK, req("error", Str), opt("job_id", Str)],
    },
    EventSpec {
        name: "EVALUATION_COMPLETED",
        description: "a candidate finished its gauntlet",
        fields: &[
            CK,
            req("model_path", Str),
            req("win_rate_vs_random", Number),
            opt("win_rate_vs_baseline", Number),
            req("games", Int),
            opt("results_path", Str),
        ],
    },
    EventSpec {
        name: "EVALUATION_FAILED",
        description: "a gauntlet could not be run",
        fields: &[CK, opt("model_path", Str), req("error", Str)],
    },
    EventSpec {
        name: "MODEL_PROMOTED",
        description: "a candidate became the canonical model",
        fields: &[
            CK,
            req("model_path", Str),
            opt("previous_model", Str),
            opt("win_rate_vs_baseline", Number),
            opt("win_rate_vs_random", Number),
        ],
    },
    EventSpec {
        name: "PROMOTION_REJECTED",
        description: "a candidate failed a promotion gate",
        fields: &[
            CK,
            req("model_path", Str),
            req("gate", Str),
            req("value", Number),
            req("threshold", Number),
        ],
    },
    EventSpec {
        name: "MODEL_DISTRIBUTION_COMPLETE",
        description: "canonical models were copied to their targets",
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
        fields: &[CK, req("score", Number), opt("games", Int)],
    },
    EventSpec {
        name: "LOW_QUALITY_DATA_WARNING",
        description: "data quality fell under its threshold",
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
        fields: &[
            req("cpu_percent", Number),
            opt("gpu_percent", Number),
            opt("jobs_started", Int),
        ],
    },
    EventSpec {
        name: "BACKPRESSURE_ACTIVATED",
        description: "a bounded queue filled up",
        fields: &[req("queue", Str), req("depth", Int), req("limit", Int)],
    },
    EventSpec {
        name: "BACKPRESSURE_RELEASED",
        description: "a bounded queue drained again",
        fields: &[req("queue", Str), req("depth", Int), req("limit", Int)],
    },
    EventSpec {
        name: "JOB_REAPED",
        description: "JOB_REAPER stopped a process",
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
        fields: &[req("daemon", Str), req("pid", Int)],
    },
    EventSpec {
        name: "DAEMON_STOPPED",
        description: "a daemon stopped",
        fields: &[
            req("daemon", Str),
            opt("last_exit", Str),
            opt("reason", Str),
        ],
    },
    EventSpec {
        name: "DAEMON_FAILED",
        description: "a daemon exhausted its restart budget",
        fields: &[req("daemon", Str), req("reason", Str)],
    },
    EventSpec {
        name: "NODE_HEALTH_CHANGED",
        description: "the node's health changed",
        fields: &[
            req("healthy", Bool),
            opt("message", Str),
            opt("details", Object),
        ],
    },
];

pub fn find(name: &str) -> Option<&'static EventSpec> {
    EVENTS.iter().find(|e| e.name == name)
}

/// Event type names are accepted in either case; this is the canonical (upper) form.
pub fn normalize(name: &str) -> String {
    name.trim().to_ascii_uppercase().replace('-', "_")
}

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

fn check(ty: FieldType, v: &Value) -> Result<(), String> {
    let ok = match ty {
        Str => v.is_string(),
        Int => v.is_i64() || v.is_u64(),
        Number => v.is_number(),
        Bool => v.is_boolean(),
        Object => v.is_object(),
        ConfigKey => {
            return match v.as_str() {
                Some(s) => parse_config_key(s).map(|_| ()),
                None => Err(format!("must be {}", type_name(ty))),
            };
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("must be {}", type_name(ty)))
    }
}

/// Board types a config key may name.
pub const BOARD_TYPES: &[&str] = &["hex8", "hex6", "square8", "square19", "hexagonal"];

/// Splits "hex8_2p" into ("hex8", 2), or says what is wrong.
pub fn parse_config_key(key: &str) -> Result<(&str, u8), String> {
    let bad = || {
        format!(
            "'{key}' is not a config key like \"hex8_2p\" (board {}, 2–4 players)",
            BOARD_TYPES.join("|")
        )
    };
    let (board, players) = key.rsplit_once('_').ok_or_else(bad)?;
    let n: u8 = players
        .strip_suffix('p')
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    if !BOARD_TYPES.contains(&board) || !(2..=4).contains(&n) {
        return Err(bad());
    }
    Ok((board, n))
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
    fn the_catalog_has_every_type_the_pipeline_needs() {
        for name in [
            "NEW_GAMES_AVAILABLE",
            "SELFPLAY_COMPLETE",
            "DATA_SYNC_COMPLETED",
            "DATA_SYNC_FAILED",
            "NPZ_EXPORT_STARTED",
            "NPZ_EXPORT_COMPLETE",
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
    fn config_keys_parse() {
        assert_eq!(parse_config_key("hex8_2p"), Ok(("hex8", 2)));
        assert_eq!(parse_config_key("square19_4p"), Ok(("square19", 4)));
        assert!(parse_config_key("hex8_5p").is_err());
        assert!(parse_config_key("hex8").is_err());
    }
}
