//! The loop at a glance: one view per config key (generation, games, model age, stage, last
//! promotion, rating), merged by the supervisor from what the pipeline daemons report.
//!
//! The supervisor reads no games DB, model or state file itself. Each pipeline daemon reports the
//! facts it owns about each key in its health, under the reserved details field
//! [`DETAILS_FIELD`] (`details.pipeline = {"hex8_2p": {...}, ...}`, each value a [`KeyReport`]),
//! and [`merge`] joins them into one [`KeyView`] per key: `status --json` (`pipeline`),
//! `GET /pipeline`, `watch`, `status` and the `ringrift_pipeline_*` gauges of `/metrics` all show
//! that one view.
//!
//! Who reports what in the built-in pipeline:
//!
//! | fact | reported by |
//! | --- | --- |
//! | `games_total`, `games_since_export`, `last_export_at`, stage `export` | auto_export |
//! | stage `selfplay`; `model_written_at` (for a node that selfplays but does not promote) | selfplay_scheduler |
//! | stage `training` | training_trigger |
//! | stage `evaluation` | evaluation |
//! | `generation`, `model_sha256`, `model_written_at`, `last_promotion`, `rating`, stage `promotion` | auto_promotion |
//!
//! Daemons report times, never ages: the supervisor computes ages (`model_age_secs`) when it
//! answers, so an age is current even when the report is a few heartbeats old. A stage is what a
//! daemon's job is doing when its last heartbeat left (daemons publish their health when a job
//! starts and ends): a job shorter than a heartbeat interval may never show.
//!
//! The view is this node's: its games DB, its canonical model, its jobs, its promotions (the
//! generation and the rating are those of the ratings DB auto_promotion keeps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The reserved field of a daemon's health details under which it reports per-key facts:
/// `details.pipeline` is an object from config key to [`KeyReport`].
pub const DETAILS_FIELD: &str = "pipeline";

/// What is working on a key, in pipeline order: `Idle` (nothing), then the loop's steps. Written
/// in lower case (`"idle"`, `"selfplay"`, `"export"`, `"training"`, `"evaluation"`,
/// `"promotion"`). The order is the loop's, so the latest active stage is the greatest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Nothing works on the key right now.
    Idle,
    /// A selfplay job of the key runs (selfplay_scheduler).
    Selfplay,
    /// An export job of the key runs (auto_export).
    Export,
    /// A train job of the key runs (training_trigger).
    Training,
    /// A gauntlet job of one of the key's candidates runs (evaluation).
    Evaluation,
    /// An evaluated candidate of the key waits for auto_promotion's decision.
    Promotion,
}

impl Stage {
    /// Every stage, in pipeline order (`Idle` first).
    pub const ALL: [Stage; 6] = [
        Stage::Idle,
        Stage::Selfplay,
        Stage::Export,
        Stage::Training,
        Stage::Evaluation,
        Stage::Promotion,
    ];

    /// The stage's name as JSON and the metrics' `stage` label write it (`"training"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Selfplay => "selfplay",
            Stage::Export => "export",
            Stage::Training => "training",
            Stage::Evaluation => "evaluation",
            Stage::Promotion => "promotion",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last promotion of a key: when, and which generation it made canonical.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    /// When the candidate became the canonical model: unix time, seconds.
    pub at: f64,
    /// The generation it became (1 for the key's first promoted model).
    pub generation: u64,
}

/// What one daemon reports about one key, under `details.pipeline.<key>` of its health. Every
/// field is optional: a daemon reports only the facts it owns (see the module's table), and an
/// absent field says nothing (it is left out of the JSON rather than written as null). Fields this
/// version does not know are ignored, so a newer daemon's report still reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyReport {
    /// How many models of the key have been promoted to canonical: the canonical model's
    /// generation (auto_promotion, as its ratings DB numbers promotions; 0 before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Completed games of the key in its games DB (auto_export, by a COUNT on the indexed games
    /// table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub games_total: Option<u64>,
    /// Completed games not yet in an export (auto_export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub games_since_export: Option<u64>,
    /// When the last export was put in place: unix time, seconds (auto_export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_export_at: Option<f64>,
    /// SHA-256 (lower-case hex) of the canonical model file: what the games table's `model`
    /// column records for games it played (auto_promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// When the canonical model file was last written (its modification time): unix time,
    /// seconds (auto_promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_written_at: Option<f64>,
    /// The key's last promotion on this node (auto_promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promotion: Option<Promotion>,
    /// The canonical model's rating, Elo on the key's ladder where random play is 0
    /// (auto_promotion, from its ratings DB; absent while the model has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<f64>,
    /// The stages this daemon is working on for the key right now (empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
}

/// The merged view of one key: what `status --json` (`pipeline.<key>`) and `GET /pipeline`
/// answer. Every field is always present; null means no daemon reports it (yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyView {
    /// The canonical model's generation: how many models of the key auto_promotion has
    /// promoted on this node (0: none yet; null: auto_promotion has not reported, or cannot read
    /// its ratings DB).
    pub generation: Option<u64>,
    /// Completed games of the key in this node's games DB.
    pub games_total: Option<u64>,
    /// Completed games not yet in an export.
    pub games_since_export: Option<u64>,
    /// When the last export was put in place: unix time, seconds.
    pub last_export_at: Option<f64>,
    /// SHA-256 (lower-case hex) of the canonical model file (null: there is none); games it
    /// played carry it in the games table's `model` column.
    pub model_sha256: Option<String>,
    /// When the canonical model file was last written: unix time, seconds.
    pub model_written_at: Option<f64>,
    /// Seconds since the canonical model file was written, as of this answer (null: there is no
    /// canonical model).
    pub model_age_secs: Option<f64>,
    /// The latest active stage in pipeline order (`promotion` over `evaluation` over ... over
    /// `selfplay`), or `idle` when none is active.
    pub stage: Stage,
    /// Every stage active on the key right now, in pipeline order (several may run at once:
    /// selfplay goes on while a candidate trains).
    pub stages: Vec<Stage>,
    /// The key's last promotion on this node (null: none yet).
    pub last_promotion: Option<Promotion>,
    /// The canonical model's rating, Elo on the key's ladder where random play is 0 (null while
    /// it has none).
    pub rating: Option<f64>,
}

impl KeyView {
    fn empty() -> KeyView {
        KeyView {
            generation: None,
            games_total: None,
            games_since_export: None,
            last_export_at: None,
            model_sha256: None,
            model_written_at: None,
            model_age_secs: None,
            stage: Stage::Idle,
            stages: Vec::new(),
            last_promotion: None,
            rating: None,
        }
    }
}

/// One daemon's health details as [`merge`] reads them.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The daemon's name (reports are taken in name order: for a fact two daemons report, the
    /// first name wins).
    pub daemon: &'a str,
    /// The daemon has a live process: only then do its stages count (a dead daemon's last
    /// report may name a job that is gone). Its other facts are kept as last reported.
    pub live: bool,
    /// Its health details; only [`DETAILS_FIELD`] is read.
    pub details: &'a BTreeMap<String, Value>,
}

/// The per-key reports of one daemon's details: key → report. A key whose report does not read
/// as a [`KeyReport`] (a daemon of the user's own that writes something else) is left out.
pub fn reports(details: &BTreeMap<String, Value>) -> BTreeMap<String, KeyReport> {
    let Some(Value::Object(keys)) = details.get(DETAILS_FIELD) else {
        return BTreeMap::new();
    };
    keys.iter()
        .filter_map(|(k, v)| Some((k.clone(), serde_json::from_value(v.clone()).ok()?)))
        .collect()
}

/// `reports` as the value of [`DETAILS_FIELD`], for a daemon's details.
pub fn details_value(reports: &BTreeMap<String, KeyReport>) -> Value {
    serde_json::to_value(reports).unwrap_or(Value::Null)
}

/// Merges the daemons' reports into one view per key, `now` being the unix time (seconds) of the
/// answer. Every key some daemon reports is listed. A fact comes from the first daemon (by name)
/// that reports it; stages are the union of the live daemons' stages; `model_age_secs` is
/// `now - model_written_at` (never negative, to the millisecond).
pub fn merge<'a>(
    sources: impl IntoIterator<Item = Source<'a>>,
    now: f64,
) -> BTreeMap<String, KeyView> {
    let mut sources: Vec<Source<'a>> = sources.into_iter().collect();
    sources.sort_by(|a, b| a.daemon.cmp(b.daemon));
    let mut out: BTreeMap<String, KeyView> = BTreeMap::new();
    for source in &sources {
        for (key, r) in reports(source.details) {
            let v = out.entry(key).or_insert_with(KeyView::empty);
            v.generation = v.generation.or(r.generation);
            v.games_total = v.games_total.or(r.games_total);
            v.games_since_export = v.games_since_export.or(r.games_since_export);
            v.last_export_at = v.last_export_at.or(r.last_export_at);
            if v.model_sha256.is_none() {
                v.model_sha256 = r.model_sha256;
            }
            v.model_written_at = v.model_written_at.or(r.model_written_at);
            v.last_promotion = v.last_promotion.or(r.last_promotion);
            v.rating = v.rating.or(r.rating);
            if source.live {
                v.stages
                    .extend(r.stages.into_iter().filter(|s| *s != Stage::Idle));
            }
        }
    }
    for v in out.values_mut() {
        v.stages.sort();
        v.stages.dedup();
        v.stage = v.stages.last().copied().unwrap_or(Stage::Idle);
        v.model_age_secs = v
            .model_written_at
            .map(|at| ((now - at).max(0.0) * 1000.0).round() / 1000.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn details(v: Value) -> BTreeMap<String, Value> {
        BTreeMap::from([(DETAILS_FIELD.to_string(), v)])
    }

    #[test]
    fn each_daemon_adds_its_facts_and_the_latest_stage_wins() {
        let export = details(json!({
            "hex8_2p": {"games_total": 1200, "games_since_export": 100, "last_export_at": 990.0,
                        "stages": ["export"]},
            "hex6_2p": {"games_total": 0, "games_since_export": 0}
        }));
        let promotion = details(json!({
            "hex8_2p": {"generation": 3, "model_sha256": "ab", "model_written_at": 900.5,
                        "last_promotion": {"at": 900.0, "generation": 3}},
            "hex6_2p": {"generation": 0}
        }));
        let selfplay = details(json!({"hex8_2p": {"stages": ["selfplay"]}}));
        let training = details(json!({"hex8_2p": {"stages": ["training"]}}));
        let other = BTreeMap::from([("keys".to_string(), json!({"hex8_2p": 1}))]);
        let view = merge(
            [
                Source {
                    daemon: "training_trigger",
                    live: true,
                    details: &training,
                },
                Source {
                    daemon: "auto_export",
                    live: true,
                    details: &export,
                },
                Source {
                    daemon: "selfplay_scheduler",
                    live: true,
                    details: &selfplay,
                },
                Source {
                    daemon: "auto_promotion",
                    live: true,
                    details: &promotion,
                },
                Source {
                    daemon: "auto_sync",
                    live: true,
                    details: &other,
                },
            ],
            1000.0,
        );
        assert_eq!(view.keys().collect::<Vec<_>>(), ["hex6_2p", "hex8_2p"]);
        let v = &view["hex8_2p"];
        assert_eq!(
            v,
            &KeyView {
                generation: Some(3),
                games_total: Some(1200),
                games_since_export: Some(100),
                last_export_at: Some(990.0),
                model_sha256: Some("ab".into()),
                model_written_at: Some(900.5),
                model_age_secs: Some(99.5),
                stage: Stage::Training,
                stages: vec![Stage::Selfplay, Stage::Export, Stage::Training],
                last_promotion: Some(Promotion {
                    at: 900.0,
                    generation: 3
                }),
                rating: None,
            }
        );
        let idle = &view["hex6_2p"];
        assert_eq!(
            (idle.stage, idle.generation, idle.games_total),
            (Stage::Idle, Some(0), Some(0))
        );
        assert_eq!((idle.model_age_secs, idle.rating), (None, None));
        // Every field is written, null or not.
        let json = serde_json::to_value(idle).unwrap();
        assert_eq!(json["rating"], Value::Null);
        assert_eq!(json["stage"], "idle");
        assert_eq!(json.as_object().unwrap().len(), 11);
    }

    #[test]
    fn a_dead_daemons_stages_do_not_count_but_its_facts_do() {
        let export = details(json!({"hex8_2p": {"games_total": 5, "stages": ["export"]}}));
        let view = merge(
            [Source {
                daemon: "auto_export",
                live: false,
                details: &export,
            }],
            0.0,
        );
        let v = &view["hex8_2p"];
        assert_eq!((v.stage, v.games_total), (Stage::Idle, Some(5)));
        assert!(v.stages.is_empty());
    }

    #[test]
    fn the_first_daemon_by_name_wins_and_unreadable_reports_are_left_out() {
        let a = details(json!({"hex8_2p": {"games_total": 1}, "bad": {"games_total": "many"}}));
        let b = details(json!({"hex8_2p": {"games_total": 2, "rating": 1510.5},
                               "odd": {"unknown_fact": 1}}));
        let c = details(json!(["not", "an", "object"]));
        let view = merge(
            [
                Source {
                    daemon: "b",
                    live: true,
                    details: &b,
                },
                Source {
                    daemon: "c",
                    live: true,
                    details: &c,
                },
                Source {
                    daemon: "a",
                    live: true,
                    details: &a,
                },
            ],
            0.0,
        );
        assert_eq!(view.keys().collect::<Vec<_>>(), ["hex8_2p", "odd"]);
        assert_eq!(view["odd"], KeyView::empty());
        assert_eq!(view["hex8_2p"].games_total, Some(1));
        assert_eq!(view["hex8_2p"].rating, Some(1510.5));
        // A model written "in the future" (clock skew) is 0 s old, not negative.
        let p = details(json!({"k": {"model_written_at": 10.0}}));
        let view = merge(
            [Source {
                daemon: "auto_promotion",
                live: true,
                details: &p,
            }],
            5.0,
        );
        assert_eq!(view["k"].model_age_secs, Some(0.0));
    }

    #[test]
    fn a_report_round_trips_through_details_without_the_facts_it_does_not_own() {
        let mut reports_in = BTreeMap::new();
        reports_in.insert(
            "hex8_2p".to_string(),
            KeyReport {
                stages: vec![Stage::Training],
                ..KeyReport::default()
            },
        );
        let v = details_value(&reports_in);
        assert_eq!(v, json!({"hex8_2p": {"stages": ["training"]}}));
        assert_eq!(reports(&details(v)), reports_in);
        assert_eq!(Stage::ALL.iter().max(), Some(&Stage::Promotion));
        assert_eq!(Stage::Evaluation.to_string(), "evaluation");
    }
}
