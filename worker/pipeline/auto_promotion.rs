//! AUTO_PROMOTION: decides from gauntlet results whether a candidate becomes the canonical model,
//! and swaps it in without ever leaving a broken or half-written canonical model behind.
//!
//! Why it is shaped this way:
//! - The gates are one pure function ([`decide`]): win rate against random play, win rate against
//!   the canonical model (only when a loadable canonical model exists: the first model of a key has
//!   nothing to beat), enough games, and a per-key cooldown. The first failing gate is named in
//!   PROMOTION_REJECTED.
//! - Results compared against no baseline while a canonical model now exists (another candidate was
//!   promoted meanwhile) are stale: the results file is set aside as `.eval.json.stale` so
//!   evaluation plays the candidate again against the current canonical model.
//! - Promotion trusts only the results file its own pipeline wrote. EVALUATION_COMPLETED names a
//!   candidate; the candidate must be a regular file directly in models/candidates/<key>/ (symlinks
//!   resolved, see [`super::confine`]), its `<name>.eval.json` beside it must name it and record its
//!   SHA-256 (evaluation writes both), the event's numbers must agree with that file, and the gates
//!   use the file's numbers. An event that fails any of this is refused with PROMOTION_REJECTED
//!   (gate `provenance`, with a `reason`) and decides nothing: the scan decides the candidate, if it
//!   is one, from the file. Results that record no hash (written before hashes were) send the
//!   candidate back for evaluation once.
//! - The swap ([`super::canonical`]) installs the bytes read once through a confined handle, after
//!   their SHA-256 is checked against the results file: what was evaluated is what is installed.
//! - Decided candidates are kept in the state file; each cycle scans `*.eval.json` files for
//!   undecided ones, so a lost EVALUATION_COMPLETED only delays a decision.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auto_export::quarantine;
use super::canonical::{Candidate, Layout, point_link, swap_in};
use super::confine::{ConfinementError, confined_file, read_confined};
use super::evaluation::{
    Record, Results, candidate_key, candidate_name, candidates, eval_path, read_record,
};
use super::ratings_db::{Promotion, RatingsDb, matches_of};
use super::sha256;
use super::{Pipeline, load_state, now_secs, save_daemon_state, typed, view_details};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::pipeline_view::{KeyReport, Promotion as LastPromotion, Stage};
use ringrift::ratings::Rating;
use ringrift::settings::PromotionSettings;

const NAME: &str = "auto_promotion";

/// How old a results file must be before the cycle's scan decides on it without its
/// EVALUATION_COMPLETED (see `reconcile`).
const LOST_EVENT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(AutoPromotion::default())
}

/// The promotion thresholds from the settings.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Thresholds {
    min_vs_random: f64,
    min_vs_baseline: f64,
    min_games: u64,
    cooldown: f64,
    /// The most the fitted rating may fall below the canonical model's (Elo).
    max_elo_drop: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Promote,
    Reject {
        gate: &'static str,
        value: f64,
        threshold: f64,
    },
    /// Evaluated without a baseline, but a canonical model exists now: evaluate again.
    Stale,
}

/// The promotion gates, in order; the first that fails decides.
fn decide(
    r: &Results,
    t: &Thresholds,
    canonical_exists: bool,
    now: f64,
    last_promotion: Option<f64>,
    rating_change: Option<f64>,
) -> Verdict {
    if r.win_rate_vs_random < t.min_vs_random {
        return Verdict::Reject {
            gate: "win_rate_vs_random",
            value: r.win_rate_vs_random,
            threshold: t.min_vs_random,
        };
    }
    if canonical_exists && let Some(t) = &r.sprt {
        // A sequential test decides against the baseline instead of a fixed threshold.
        if t.result != "accept" {
            return Verdict::Reject {
                gate: "sprt",
                value: t.llr,
                threshold: t.upper,
            };
        }
    } else if canonical_exists {
        match r.win_rate_vs_baseline {
            None => return Verdict::Stale,
            Some(rate) if rate < t.min_vs_baseline => {
                return Verdict::Reject {
                    gate: "win_rate_vs_baseline",
                    value: rate,
                    threshold: t.min_vs_baseline,
                };
            }
            Some(_) => {}
        }
    }
    // The ladder: a candidate that beats its predecessor but does worse against the fixed
    // references (the heuristic player, pinned generations) rates lower over all games. That is
    // a regression the head-to-head test cannot see (generation 8 losing to generation 4).
    if canonical_exists
        && let Some(change) = rating_change
        && change < -t.max_elo_drop
    {
        return Verdict::Reject {
            gate: "rating",
            value: change,
            threshold: -t.max_elo_drop,
        };
    }
    if r.games < t.min_games {
        return Verdict::Reject {
            gate: "min_games",
            value: r.games as f64,
            threshold: t.min_games as f64,
        };
    }
    if let Some(last) = last_promotion {
        let since = now - last;
        if since < t.cooldown {
            return Verdict::Reject {
                gate: "cooldown",
                value: since.max(0.0),
                threshold: t.cooldown,
            };
        }
    }
    Verdict::Promote
}

/// Why an EVALUATION_COMPLETED is not acted on: the event's claims checked against the files.
/// Gives the candidate (named as the daemon names it) and its results file on success.
fn verify_event(pipeline: &Pipeline, key: &str, p: &Value) -> Result<(PathBuf, Record), Refused> {
    let dir = pipeline.candidates_dir(key);
    let named = p
        .get("model_path")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let candidate = confined_file(&dir, Path::new(named)).map_err(Refused::ModelPath)?;
    if candidate.parent() != Some(dir.as_path()) || !candidate_name(&candidate) {
        return Err(Refused::NotCandidate {
            named: named.to_string(),
            dir,
        });
    }
    let results_path = eval_path(&candidate);
    if let Some(claimed) = p.get("results_path").and_then(Value::as_str) {
        let claimed = confined_file(&dir, Path::new(claimed)).map_err(Refused::ResultsPath)?;
        if claimed != results_path {
            return Err(Refused::NotResultsOf {
                claimed,
                candidate,
                results_path,
            });
        }
    }
    let record = match read_record(&dir, &candidate) {
        Ok(r) => r,
        Err(cause) => return Err(Refused::NoResults { candidate, cause }),
    };
    if let Some(other) = record.model_path.as_deref()
        && other != candidate.display().to_string()
    {
        return Err(Refused::OtherModel {
            results_path,
            other: other.to_string(),
            candidate,
        });
    }
    let claimed = Results {
        win_rate_vs_random: p
            .get("win_rate_vs_random")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        win_rate_vs_baseline: p.get("win_rate_vs_baseline").and_then(Value::as_f64),
        games: p.get("games").and_then(Value::as_u64).unwrap_or(0),
        sprt: None,
    };
    if !same_results(&claimed, &record.results) {
        return Err(Refused::Numbers {
            claimed: describe(&claimed),
            results_path,
            recorded: describe(&record.results),
        });
    }
    Ok((candidate, record))
}

/// Why an EVALUATION_COMPLETED is not acted on (see [`verify_event`]).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("model_path: {0}")]
    ModelPath(ConfinementError),
    #[error("model_path: {named} is not a candidate (<name>.bin directly in {})", dir.display())]
    NotCandidate { named: String, dir: PathBuf },
    #[error("results_path: {0}")]
    ResultsPath(ConfinementError),
    #[error(
        "results_path {} is not the results of {} ({})",
        claimed.display(),
        candidate.display(),
        results_path.display()
    )]
    NotResultsOf {
        claimed: PathBuf,
        candidate: PathBuf,
        results_path: PathBuf,
    },
    #[error("no usable evaluation results for {} ({cause:#})", candidate.display())]
    NoResults {
        candidate: PathBuf,
        cause: anyhow::Error,
    },
    #[error("{} is the evaluation of {other}, not of {}", results_path.display(), candidate.display())]
    OtherModel {
        results_path: PathBuf,
        other: String,
        candidate: PathBuf,
    },
    #[error("the event's numbers ({claimed}) disagree with {} ({recorded})", results_path.display())]
    Numbers {
        claimed: String,
        results_path: PathBuf,
        recorded: String,
    },
}

fn same_results(a: &Results, b: &Results) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9;
    close(a.win_rate_vs_random, b.win_rate_vs_random)
        && match (a.win_rate_vs_baseline, b.win_rate_vs_baseline) {
            (None, None) => true,
            (Some(x), Some(y)) => close(x, y),
            _ => false,
        }
        && a.games == b.games
}

fn describe(r: &Results) -> String {
    format!(
        "{} vs random, {} vs baseline, {} games",
        r.win_rate_vs_random,
        r.win_rate_vs_baseline
            .map_or("none".to_string(), |b| b.to_string()),
        r.games
    )
}

/// The gate a provenance refusal is reported under (value 0, threshold 1, and a `reason`).
const PROVENANCE: &str = "provenance";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Decided {
    promoted: bool,
    /// The failing gate of a rejection.
    gate: Option<String>,
    at: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Candidate path → decision.
    decided: BTreeMap<String, Decided>,
    last_promotion_at: BTreeMap<String, f64>,
    /// Candidates already sent back for a re-evaluation against the canonical model.
    reevaluated: Vec<String>,
}

/// The canonical model of a key as last looked at, for the per-key view: its SHA-256 (what the
/// games table's `model` column records) and when it was written, hashed again only when its
/// length or modification time changes.
#[derive(Debug, Clone, PartialEq)]
struct ModelFacts {
    len: u64,
    modified: SystemTime,
    sha256: String,
}

#[derive(Default)]
struct AutoPromotion {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    thresholds: Option<Thresholds>,
    keep_candidates: u64,
    keep_backups: u64,
    pin_every: u64,
    pinned_keep: u64,
    /// Per key: the ladder as last fitted and the promotion it justified.
    ladder: BTreeMap<String, Value>,
    /// Candidates and backups deleted by retention since start.
    pruned: u64,
    state: State,
    last: String,
    ok: bool,
    last_error: Option<String>,
    decisions: u64,
    promotions: u64,
    rejections: u64,
    errors: u64,
    reevaluations: u64,
    refused: u64,
    /// Each key's canonical model, as last looked at (none: there is no canonical model).
    models: BTreeMap<String, ModelFacts>,
    /// Keys with an evaluated candidate not decided yet (stage `promotion`).
    pending: BTreeSet<String>,
}

impl AutoPromotion {
    fn report(&self) -> Report {
        let canonical: serde_json::Map<String, Value> = self
            .pipeline
            .iter()
            .flat_map(|p| p.config_keys.iter().map(move |k| (k, p.canonical(k))))
            .map(|(k, c)| {
                (
                    k.clone(),
                    json!(c.exists().then(|| c.display().to_string())),
                )
            })
            .collect();
        let message = if self.last.is_empty() {
            "no candidate decided yet".to_string()
        } else {
            self.last.clone()
        };
        let mut details = BTreeMap::from([
            ("canonical".to_string(), Value::Object(canonical)),
            ("decided".to_string(), Value::from(self.state.decided.len())),
            (
                "ladder".to_string(),
                Value::Object(self.ladder.clone().into_iter().collect()),
            ),
            ("last_error".to_string(), json!(self.last_error)),
        ]);
        view_details(&mut details, self.view());
        Report::new(
            self.ok,
            message,
            details,
            [
                ("decisions", self.decisions),
                ("promotions", self.promotions),
                ("rejections", self.rejections),
                ("promotion_errors", self.errors),
                ("reevaluations", self.reevaluations),
                ("refused_events", self.refused),
                ("files_pruned", self.pruned),
            ],
        )
    }

    /// This daemon's facts for the per-key view: the canonical model's generation, SHA-256 and
    /// age, the last promotion, the rating, and stage `promotion` while an evaluated candidate
    /// waits for a decision.
    fn view(&self) -> BTreeMap<String, KeyReport> {
        let keys = self.pipeline.iter().flat_map(|p| p.config_keys.iter());
        keys.map(|k| {
            // The ladder's figures: the ratings DB counts the promotions (the generation) and
            // fits the Elo of the canonical model.
            let ladder = self.ladder.get(k);
            let generation = ladder
                .and_then(|l| l.get("generation"))
                .and_then(Value::as_u64);
            let model = self.models.get(k);
            let report = KeyReport {
                generation,
                model_sha256: model.map(|m| m.sha256.clone()),
                model_written_at: model.and_then(|m| {
                    m.modified
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs_f64())
                }),
                last_promotion: self
                    .state
                    .last_promotion_at
                    .get(k)
                    .zip(generation)
                    .map(|(&at, generation)| LastPromotion { at, generation }),
                rating: ladder
                    .and_then(|l| l.get("rating_elo"))
                    .and_then(Value::as_f64),
                stages: if self.pending.contains(k) {
                    vec![Stage::Promotion]
                } else {
                    Vec::new()
                },
                ..KeyReport::default()
            };
            (k.clone(), report)
        })
        .collect()
    }

    /// Looks at each key's canonical model again (hashing only one that changed), for the
    /// per-key view.
    fn refresh_models(&mut self) {
        let Some(pipeline) = self.pipeline.clone() else {
            return;
        };
        for key in &pipeline.config_keys {
            let path = pipeline.canonical(key);
            let seen = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file())
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            let Some((len, modified)) = seen else {
                self.models.remove(key);
                continue;
            };
            if self
                .models
                .get(key)
                .is_some_and(|m| m.len == len && m.modified == modified)
            {
                continue;
            }
            match sha256::file_hex(&path) {
                Ok(sha256) => {
                    self.models.insert(
                        key.clone(),
                        ModelFacts {
                            len,
                            modified,
                            sha256,
                        },
                    );
                }
                Err(e) => {
                    eprintln!("{NAME}: {key}: cannot hash {}: {e:#}", path.display());
                    self.models.remove(key);
                }
            }
        }
    }

    fn save(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        if let Err(e) = save_daemon_state(pipeline, NAME, &self.state) {
            eprintln!("{NAME}: {e}");
            self.last_error = Some(e.to_string());
            self.ok = false;
        }
    }

    fn record(&mut self, candidate: &Path, promoted: bool, gate: Option<&str>) {
        self.decisions += 1;
        if let Some(key) = candidate_key(candidate) {
            // Another candidate of the key may still wait: the next scan says.
            self.pending.remove(&key);
        }
        self.state.decided.insert(
            candidate.display().to_string(),
            Decided {
                promoted,
                gate: gate.map(str::to_string),
                at: now_secs(),
            },
        );
        if let Some(key) = candidate_key(candidate) {
            self.prune_candidates(&key);
        }
        self.save();
    }

    /// Retention: the decided candidates of `key` beyond the newest `keep_candidates` are
    /// deleted with their results (`<name>.eval.json`, a set-aside `.stale` one) and forgotten.
    fn prune_candidates(&mut self, key: &str) {
        if self.keep_candidates == 0 {
            return;
        }
        let mut mine: Vec<(f64, String)> = self
            .state
            .decided
            .iter()
            .filter(|(path, _)| candidate_key(Path::new(path)).as_deref() == Some(key))
            .map(|(path, d)| (d.at, path.clone()))
            .collect();
        mine.sort_by(|a, b| a.0.total_cmp(&b.0));
        let excess = mine.len().saturating_sub(self.keep_candidates as usize);
        for (_, path) in mine.into_iter().take(excess) {
            let model = PathBuf::from(&path);
            let eval = eval_path(&model);
            for file in [
                model.clone(),
                eval.clone(),
                eval.with_extension("json.stale"),
            ] {
                match std::fs::remove_file(&file) {
                    Ok(()) => self.pruned += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => eprintln!("{NAME}: cannot delete {}: {e}", file.display()),
                }
            }
            self.state.decided.remove(&path);
            self.state.reevaluated.retain(|p| p != &path);
        }
        // Files set aside (a candidate that did not load or validate: `.bad`; results played
        // against an older baseline: `.stale`) are kept to the same count, newest first.
        let Some(dir) = self.pipeline.as_ref().map(|p| p.candidates_dir(key)) else {
            return;
        };
        let mut aside: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(".bad") || name.ends_with(".stale")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        aside.sort();
        let excess = aside.len().saturating_sub(self.keep_candidates as usize);
        for (_, file) in aside.into_iter().take(excess) {
            if std::fs::remove_file(&file).is_ok() {
                self.pruned += 1;
            }
        }
    }

    fn reject(&mut self, key: &str, candidate: &Path, gate: &str, value: f64, threshold: f64) {
        self.rejections += 1;
        self.record(candidate, false, Some(gate));
        self.last = format!(
            "rejected {} at {}: {gate} {value} < {threshold}",
            candidate.display(),
            ringrift::timefmt::now_rfc3339()
        );
        println!("{NAME}: {}", self.last);
        self.emit_rejection(
            key,
            &candidate.display().to_string(),
            gate,
            value,
            threshold,
            None,
        );
    }

    /// Rejects a candidate whose files do not prove what was evaluated (recorded as decided).
    fn reject_provenance(&mut self, key: &str, candidate: &Path, reason: String) {
        self.rejections += 1;
        self.record(candidate, false, Some(PROVENANCE));
        self.last = format!(
            "rejected {} at {}: {reason}",
            candidate.display(),
            ringrift::timefmt::now_rfc3339()
        );
        eprintln!("{NAME}: {}", self.last);
        let id = candidate.display().to_string();
        self.emit_rejection(key, &id, PROVENANCE, 0.0, 1.0, Some(reason));
    }

    /// Refuses an EVALUATION_COMPLETED whose claims the files do not bear out. Nothing is decided:
    /// the named file may not be a candidate at all, and a real candidate is decided from its own
    /// results file by the scan.
    fn refuse(&mut self, key: &str, named: &str, reason: String) {
        self.refused += 1;
        let message = format!("refused EVALUATION_COMPLETED for {named}: {reason}");
        eprintln!("{NAME}: {key}: {message}");
        self.last_error = Some(format!("{} {message}", ringrift::timefmt::now_rfc3339()));
        self.emit_rejection(key, named, PROVENANCE, 0.0, 1.0, Some(reason));
    }

    fn emit_rejection(
        &self,
        key: &str,
        model_path: &str,
        gate: &str,
        value: f64,
        threshold: f64,
        reason: Option<String>,
    ) {
        let mut p = payload([
            ("config_key", key.into()),
            ("model_path", model_path.into()),
            ("gate", gate.into()),
            ("value", value.into()),
            ("threshold", threshold.into()),
        ]);
        if let Some(reason) = reason {
            p["reason"] = reason.into();
        }
        self.ctx
            .as_ref()
            .expect("attached")
            .emit("PROMOTION_REJECTED", p);
    }

    /// Sets a candidate's results aside so evaluation plays it again.
    fn send_back(&mut self, candidate: &Path, why: String) {
        let id = candidate.display().to_string();
        let results_path = eval_path(candidate);
        let mut stale = results_path.clone().into_os_string();
        stale.push(".stale");
        match std::fs::rename(&results_path, &stale) {
            Ok(()) => {
                self.reevaluations += 1;
                self.state.reevaluated.push(id.clone());
                self.save();
                self.last = format!("{id}: {why}: sent back for evaluation");
                println!("{NAME}: {}", self.last);
            }
            Err(e) => self.error(format!(
                "cannot set aside stale results {}: {e}",
                results_path.display()
            )),
        }
    }

    /// Decides one evaluated candidate (once), from its results file.
    fn consider(&mut self, candidate: &Path, record: &Record) {
        let id = candidate.display().to_string();
        if self.state.decided.contains_key(&id) {
            return;
        }
        let Some(key) = candidate_key(candidate) else {
            println!("{NAME}: ignoring {id}: not a candidate under models/candidates/<key>/");
            return;
        };
        if !self.leads(&key) {
            return; // another node of the cluster holds the promotion lease of this key
        }
        if !candidate.exists() {
            println!("{NAME}: {id} is gone (quarantined or deleted): nothing to decide");
            return;
        }
        match (&record.model_path, &record.model_sha256) {
            (Some(named), _) if *named != id => {
                let reason = format!(
                    "{} is the evaluation of {named}, not of {id}",
                    eval_path(candidate).display()
                );
                return self.reject_provenance(&key, candidate, reason);
            }
            (Some(_), Some(_)) => {}
            _ if self.state.reevaluated.contains(&id) => {
                let reason = format!(
                    "{} records no model_path/model_sha256 even after a re-evaluation",
                    eval_path(candidate).display()
                );
                return self.reject_provenance(&key, candidate, reason);
            }
            _ => {
                let why = "its results record no model hash (written by an older version)";
                return self.send_back(candidate, why.to_string());
            }
        }
        let results = &record.results;
        let pipeline = self.pipeline.clone().expect("started");
        let canonical = pipeline.canonical(&key);
        // A canonical model that does not load is no baseline: promotion replaces it.
        let canonical_ok = canonical.exists() && pipeline.check_model(&canonical, &key).is_ok();
        if canonical.exists() && !canonical_ok {
            eprintln!(
                "{NAME}: {key}: the canonical model {} does not load; only the random gate applies",
                canonical.display()
            );
        }
        // Measured against another model than this node's canonical one (an evaluation node
        // whose copy was older): evaluated again, once.
        if canonical_ok
            && let Some(played) = &record.baseline_sha256
            && sha256::file_hex(&canonical).ok().as_ref() != Some(played)
            && !self.state.reevaluated.contains(&id)
        {
            let why = format!(
                "evaluated against a baseline with SHA-256 {played}, not the canonical model {}",
                canonical.display()
            );
            return self.send_back(candidate, why);
        }
        let ratings = self.rate(&pipeline, &key, candidate, record);
        // The candidate's rating minus the canonical model's, when the ladder rates both.
        let rating_change = canonical_ok
            .then(|| sha256::file_hex(&canonical).ok())
            .flatten()
            .and_then(|c| ratings.get(&c).map(|r| r.elo))
            .zip(
                record
                    .model_sha256
                    .as_ref()
                    .and_then(|s| ratings.get(s))
                    .map(|r| r.elo),
            )
            .map(|(canonical, candidate)| candidate - canonical);
        let t = self.thresholds.expect("started");
        let last = self.state.last_promotion_at.get(&key).copied();
        match decide(results, &t, canonical_ok, now_secs(), last, rating_change) {
            Verdict::Reject {
                gate,
                value,
                threshold,
            } => self.reject(&key, candidate, gate, value, threshold),
            Verdict::Stale if self.state.reevaluated.contains(&id) => {
                // Evaluated again and still no baseline result: the gauntlet cannot measure it.
                self.reject(
                    &key,
                    candidate,
                    "win_rate_vs_baseline",
                    0.0,
                    t.min_vs_baseline,
                );
            }
            Verdict::Stale => {
                let why = format!(
                    "evaluated without a baseline but {} exists now",
                    canonical.display()
                );
                self.send_back(candidate, why);
            }
            Verdict::Promote => self.promote(&pipeline, &key, candidate, record, &ratings),
        }
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        self.ok = false;
        super::note_error(&mut self.last_error, NAME, &message);
        self.last = message;
    }

    /// Records the games of a verified results file in the ratings DB (once per file) and
    /// re-fits the key's ladder. A DB that cannot be written is noted; the decision goes on
    /// without ratings (they follow at the next decision).
    fn rate(
        &mut self,
        pipeline: &Pipeline,
        key: &str,
        candidate: &Path,
        record: &Record,
    ) -> BTreeMap<String, Rating> {
        let Some(sha) = record.model_sha256.as_deref() else {
            return BTreeMap::new();
        };
        let matches = matches_of(&record.raw, sha, record.baseline_sha256.as_deref());
        let name = candidate
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let evaluation = eval_path(candidate).display().to_string();
        match RatingsDb::open(&pipeline.root)
            .and_then(|mut db| db.record(key, &evaluation, (sha, &name), &matches, now_secs()))
        {
            Ok(ratings) => {
                if let Some(r) = ratings.get(sha) {
                    println!(
                        "{NAME}: {key}: {name} rated {:.0} Elo over {} games (random play 0)",
                        r.elo, r.games
                    );
                }
                ratings
            }
            Err(e) => {
                self.error(format!("{key}: cannot record ratings: {e:#}"));
                BTreeMap::new()
            }
        }
    }

    /// Pins the new canonical model of generation `generation` as a reference opponent when the
    /// schedule says so, keeping the newest `pinned_keep`.
    fn pin(&mut self, pipeline: &Pipeline, key: &str, generation: u64, bytes: &[u8]) {
        if self.pin_every == 0 || (generation != 1 && !generation.is_multiple_of(self.pin_every)) {
            return;
        }
        let dir = pipeline.reference_dir(key);
        let to = dir.join(format!("gen-{generation}.bin"));
        let tmp = dir.join(format!(".gen-{generation}.bin.tmp"));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &to));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            self.error(format!("{key}: cannot pin generation {generation}: {e}"));
            return;
        }
        println!(
            "{NAME}: {key}: generation {generation} pinned as a reference opponent: {}",
            to.display()
        );
        let mut pinned: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let n = name
                    .strip_prefix("gen-")?
                    .strip_suffix(".bin")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        pinned.sort();
        let excess = pinned.len().saturating_sub(self.pinned_keep as usize);
        for (_, path) in pinned.into_iter().take(excess) {
            if std::fs::remove_file(&path).is_ok() {
                self.pruned += 1;
            }
        }
    }

    fn promote(
        &mut self,
        pipeline: &Pipeline,
        key: &str,
        candidate: &Path,
        record: &Record,
        ratings: &BTreeMap<String, Rating>,
    ) {
        let results = &record.results;
        // One read through a confined handle: what is hashed, checked and installed is the same.
        let (bytes, mode, _) = match read_confined(&pipeline.candidates_dir(key), candidate) {
            Ok(read) => read,
            Err(e) => return self.reject_provenance(key, candidate, e.to_string()),
        };
        let sha = sha256::hex_of(&bytes);
        if record.model_sha256.as_deref() != Some(sha.as_str()) {
            let reason = format!(
                "{} changed since it was evaluated (SHA-256 {sha}, evaluated {})",
                candidate.display(),
                record.model_sha256.as_deref().unwrap_or("unknown")
            );
            return self.reject_provenance(key, candidate, reason);
        }
        if let Err(e) = pipeline.check_model(candidate, key) {
            let moved = quarantine(candidate)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            eprintln!(
                "{NAME}: {}: does not load ({e:#}); quarantined as {moved}",
                candidate.display()
            );
            self.reject(key, candidate, "candidate_loads", 0.0, 1.0);
            return;
        }
        let layout = Layout {
            canonical: pipeline.canonical(key),
            best_link: pipeline.best_link(key),
            backup_dir: pipeline.backup_dir(),
        };
        let ms = (now_secs() * 1000.0) as u64;
        let source = Candidate {
            bytes: &bytes,
            mode,
        };
        let check = |copy: &Path| pipeline.check_model(copy, key);
        let backup = match swap_in(&source, key, &layout, ms, &check) {
            Ok(b) => b,
            Err(e) => {
                // Not recorded as decided: tried again next cycle. The canonical model is intact.
                self.error(format!(
                    "promotion of {} failed, retrying: {e:#}",
                    candidate.display()
                ));
                return;
            }
        };
        self.promotions += 1;
        self.ok = true;
        let pruned = super::canonical::prune_backups(&layout.backup_dir, key, self.keep_backups);
        self.pruned += pruned.len() as u64;
        let promoted_at = now_secs();
        let promotion = Promotion {
            key,
            candidate: &candidate.display().to_string(),
            sha256: &sha,
            previous_sha256: record.baseline_sha256.as_deref(),
            evaluation: &record.raw,
            ratings,
            at: promoted_at,
        };
        let generation =
            match RatingsDb::open(&pipeline.root).and_then(|mut db| db.promoted(&promotion)) {
                Ok(g) => Some(g),
                Err(e) => {
                    self.error(format!("{key}: cannot record the promotion: {e:#}"));
                    None
                }
            };
        if let Some(g) = generation {
            self.pin(pipeline, key, g, &bytes);
        }
        let rating = ratings.get(&sha).map(|r| r.elo);
        self.ladder.insert(
            key.to_string(),
            json!({
                "generation": generation,
                "rating_elo": rating,
                "model_sha256": sha,
                "promoted_at": promoted_at,
                "ratings": ratings.iter().map(|(p, r)| (p.clone(), json!({"elo": r.elo, "games": r.games}))).collect::<serde_json::Map<_, _>>(),
            }),
        );
        self.state
            .last_promotion_at
            .insert(key.to_string(), now_secs());
        self.record(candidate, true, None);
        self.refresh_models();
        self.last = format!(
            "promoted {} to {} at {} ({:.3} vs random, {}){}",
            candidate.display(),
            layout.canonical.display(),
            ringrift::timefmt::now_rfc3339(),
            results.win_rate_vs_random,
            results
                .win_rate_vs_baseline
                .map_or("no baseline".to_string(), |r| format!("{r:.3} vs baseline")),
            backup
                .as_ref()
                .map(|b| format!("; previous model backed up to {}", b.display()))
                .unwrap_or_default()
        );
        println!("{NAME}: {}", self.last);
        self.ctx.as_ref().expect("attached").emit(
            "MODEL_PROMOTED",
            payload([
                ("config_key", key.into()),
                ("model_path", layout.canonical.display().to_string().into()),
                (
                    "previous_model",
                    json!(backup.map(|b| b.display().to_string())),
                ),
                ("win_rate_vs_baseline", json!(results.win_rate_vs_baseline)),
                ("win_rate_vs_random", results.win_rate_vs_random.into()),
                ("generation", json!(generation)),
                ("rating_elo", json!(rating)),
            ]),
        );
    }

    /// Decides every evaluated, undecided candidate on disk, and repairs best-model links.
    /// This node decides promotions of `key` (in a cluster: it holds the key's lease).
    fn leads(&self, key: &str) -> bool {
        self.ctx.as_ref().is_none_or(|c| c.leads(key))
    }

    fn reconcile(&mut self) {
        let pipeline = self.pipeline.clone().expect("started");
        let mut pending = BTreeSet::new();
        for candidate in candidates(&pipeline.root.join("models/candidates")) {
            let results_path = eval_path(&candidate);
            // A results file evaluation has just put in place is decided on its
            // EVALUATION_COMPLETED, which follows at once from another process: the scan, which is
            // there for a lost event, leaves it that long, so no decision comes before the event.
            let fresh = std::fs::metadata(&results_path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < LOST_EVENT_GRACE));
            let id = candidate.display().to_string();
            if !results_path.exists() || self.state.decided.contains_key(&id) {
                continue;
            }
            let key = candidate_key(&candidate);
            if fresh {
                pending.extend(key.filter(|k| self.leads(k)));
                continue;
            }
            let Some(dir) = candidate.parent() else {
                continue;
            };
            match read_record(dir, &candidate) {
                Ok(record) => self.consider(&candidate, &record),
                // Evaluation's business: it quarantines unusable results and evaluates again.
                Err(e) => eprintln!("{NAME}: skipping {}: {e:#}", results_path.display()),
            }
            // Still undecided (a promotion to retry, a re-evaluation asked for): waiting.
            if !self.state.decided.contains_key(&id) && eval_path(&candidate).exists() {
                pending.extend(key.filter(|k| self.leads(k)));
            }
        }
        self.pending = pending;
        self.refresh_models();
        for key in &pipeline.config_keys {
            let canonical = pipeline.canonical(key);
            if self.leads(key)
                && canonical.exists()
                && let Some(name) = canonical
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
            {
                match point_link(&pipeline.best_link(key), &name) {
                    Ok(true) => println!(
                        "{NAME}: {key}: repaired the link {}",
                        pipeline.best_link(key).display()
                    ),
                    Ok(false) => {}
                    Err(e) => self.error(format!(
                        "cannot repair {}: {e:#}",
                        pipeline.best_link(key).display()
                    )),
                }
            }
        }
    }
}

impl Daemon for AutoPromotion {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["EVALUATION_COMPLETED".into()]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let s = typed(settings, PromotionSettings::from_map)?;
            let t = Thresholds {
                min_vs_random: s.min_win_rate_vs_random,
                min_vs_baseline: s.min_win_rate_vs_baseline,
                min_games: s.min_games,
                cooldown: s.cooldown.as_secs_f64(),
                max_elo_drop: s.max_elo_drop,
            };
            println!("{NAME}: gates {t:?}");
            self.thresholds = Some(t);
            self.keep_candidates = s.keep_candidates;
            self.keep_backups = s.keep_backups;
            self.pin_every = s.pin_every;
            self.pinned_keep = s.pinned_keep;
            self.state = load_state(&pipeline.state_path(NAME));
            self.ok = true;
            // The ladder as recorded, so health shows it from the start (not only after the
            // next promotion).
            if let Ok(db) = RatingsDb::open(&pipeline.root) {
                for key in &pipeline.config_keys {
                    let sha = sha256::file_hex(&pipeline.canonical(key)).ok();
                    let generation = db.generation(key).unwrap_or(0);
                    let rating = sha
                        .as_deref()
                        .and_then(|s| db.rating(key, s).ok().flatten());
                    self.ladder.insert(
                        key.clone(),
                        json!({
                            "generation": generation,
                            "rating_elo": rating,
                            "model_sha256": sha,
                            "promoted_at": self.state.last_promotion_at.get(key),
                        }),
                    );
                }
            }
            self.pipeline = Some(pipeline);
            self.refresh_models();
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.reconcile();
            // Retention also when nothing is decided (every candidate quarantined, say).
            let keys = self
                .pipeline
                .as_ref()
                .map(|p| p.config_keys.clone())
                .unwrap_or_default();
            for key in keys {
                self.prune_candidates(&key);
            }
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            let pipeline = self.pipeline.clone().expect("started");
            let key = pipeline.event_config_key(NAME, &event)?;
            if !self.leads(&key) {
                println!(
                    "{NAME}: {key}: not deciding on event {}: another node holds the promotion lease of {key}",
                    event.id
                );
                return None;
            }
            // A candidate another node trained and a third evaluated is promoted where it is:
            // on its own node, whose disk has it and its results.
            if let Some(node) = event.payload.get("candidate_node").and_then(Value::as_str) {
                let own = super::transfer::cluster_view(&pipeline.root).map(|v| v.node_id);
                if own.as_deref() != Some(node) {
                    println!(
                        "{NAME}: {key}: event {} is about node {node}'s candidate: decided there",
                        event.id
                    );
                    return None;
                }
            }
            // The event only says where to look: the candidate and its numbers come from the
            // files this pipeline wrote, and an event that disagrees with them is refused.
            match verify_event(&pipeline, &key, &event.payload) {
                Ok((candidate, record)) => self.consider(&candidate, &record),
                Err(reason) => {
                    let named = event
                        .payload
                        .get("model_path")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    self.refuse(&key, &named, reason.to_string());
                }
            }
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        min_vs_random: 0.6,
        min_vs_baseline: 0.55,
        min_games: 50,
        cooldown: 100.0,
        max_elo_drop: 50.0,
    };

    fn r(random: f64, baseline: Option<f64>, games: u64) -> Results {
        Results {
            win_rate_vs_random: random,
            win_rate_vs_baseline: baseline,
            games,
            sprt: None,
        }
    }

    #[test]
    fn a_sequential_test_decides_against_the_baseline_when_there_is_one() {
        use super::super::evaluation::SprtOutcome;
        let with = |result: &str| Results {
            sprt: Some(SprtOutcome {
                result: result.into(),
                llr: if result == "accept" { 3.0 } else { -3.0 },
                upper: 2.94,
            }),
            // Under the fixed threshold, but the test accepted.
            ..r(0.9, Some(0.5), 100)
        };
        assert_eq!(
            decide(&with("accept"), &T, true, 1000.0, None, None),
            Verdict::Promote
        );
        for result in ["reject", "inconclusive"] {
            assert_eq!(
                gate(decide(&with(result), &T, true, 1000.0, None, None)),
                Some("sprt"),
                "{result}"
            );
        }
        // With no canonical model there is nothing to test against: the other gates decide.
        assert_eq!(
            decide(&with("reject"), &T, false, 1000.0, None, None),
            Verdict::Promote
        );
    }

    fn gate(v: Verdict) -> Option<&'static str> {
        match v {
            Verdict::Reject { gate, .. } => Some(gate),
            _ => None,
        }
    }

    #[test]
    fn a_candidate_rated_well_below_the_canonical_model_is_a_regression() {
        let with = |change| decide(&r(0.9, Some(0.6), 100), &T, true, 1000.0, None, change);
        assert_eq!(with(Some(-20.0)), Verdict::Promote, "within max_elo_drop");
        assert_eq!(with(None), Verdict::Promote, "not rated: no ladder gate");
        assert_eq!(
            with(Some(-84.0)),
            Verdict::Reject {
                gate: "rating",
                value: -84.0,
                threshold: -50.0
            }
        );
        let first = decide(&r(0.9, None, 100), &T, false, 1000.0, None, Some(-500.0));
        assert_eq!(
            first,
            Verdict::Promote,
            "the first model has nothing to fall below"
        );
    }

    #[test]
    fn the_first_failing_gate_is_named() {
        assert_eq!(
            decide(&r(0.9, Some(0.6), 100), &T, true, 1000.0, None, None),
            Verdict::Promote
        );
        assert_eq!(
            decide(&r(0.5, Some(0.1), 10), &T, true, 1000.0, None, None),
            Verdict::Reject {
                gate: "win_rate_vs_random",
                value: 0.5,
                threshold: 0.6
            }
        );
        assert_eq!(
            gate(decide(&r(0.9, Some(0.5), 10), &T, true, 1000.0, None, None)),
            Some("win_rate_vs_baseline")
        );
        assert_eq!(
            gate(decide(&r(0.9, Some(0.6), 10), &T, true, 1000.0, None, None)),
            Some("min_games")
        );
        assert_eq!(
            decide(&r(0.9, Some(0.6), 50), &T, true, 1000.0, Some(950.0), None),
            Verdict::Reject {
                gate: "cooldown",
                value: 50.0,
                threshold: 100.0
            }
        );
        assert_eq!(
            decide(&r(0.9, Some(0.6), 50), &T, true, 1000.0, Some(900.0), None),
            Verdict::Promote
        );
    }

    #[test]
    fn without_a_canonical_model_only_the_random_gate_applies() {
        assert_eq!(
            decide(&r(0.6, None, 50), &T, false, 0.0, None, None),
            Verdict::Promote
        );
        assert_eq!(
            decide(&r(0.6, Some(0.0), 50), &T, false, 0.0, None, None),
            Verdict::Promote
        );
        assert_eq!(
            decide(&r(0.6, None, 50), &T, true, 0.0, None, None),
            Verdict::Stale
        );
    }

    fn record_of(results: Results, path: &Path, sha: &str) -> Value {
        json!({
            "win_rate_vs_random": results.win_rate_vs_random,
            "win_rate_vs_baseline": results.win_rate_vs_baseline,
            "games_vs_random": results.games,
            "model_path": path.display().to_string(),
            "model_sha256": sha,
        })
    }

    #[test]
    fn the_per_key_view_has_the_generation_and_the_canonical_models_hash_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let keys = vec!["hex6_2p".to_string(), "hex8_2p".to_string()];
        let pipeline = Pipeline::for_test(dir.path(), keys.clone());
        let state = State {
            last_promotion_at: BTreeMap::from([("hex6_2p".to_string(), 7.5)]),
            ..State::default()
        };
        // The ladder as the ratings DB gave it: hex6_2p promoted twice and rated; hex8_2p
        // never promoted.
        let ladder = BTreeMap::from([
            (
                "hex6_2p".to_string(),
                json!({"generation": 2, "rating_elo": 312.5, "model_sha256": "x"}),
            ),
            (
                "hex8_2p".to_string(),
                json!({"generation": 0, "rating_elo": null, "model_sha256": null}),
            ),
        ]);
        std::fs::create_dir_all(pipeline.models_dir()).unwrap();
        std::fs::write(pipeline.canonical("hex6_2p"), b"model").unwrap();
        let mut daemon = AutoPromotion {
            pipeline: Some(pipeline.clone()),
            state,
            ladder,
            ..AutoPromotion::default()
        };
        daemon.refresh_models();
        let view = ringrift::pipeline_view::reports(&daemon.report().health.details);
        let hex6 = &view["hex6_2p"];
        assert_eq!(hex6.generation, Some(2));
        assert_eq!(
            hex6.model_sha256.as_deref(),
            Some(sha256::hex_of(b"model").as_str())
        );
        let written = hex6.model_written_at.unwrap();
        assert!((written - now_secs()).abs() < 60.0, "{written}");
        assert_eq!(
            hex6.last_promotion,
            Some(LastPromotion {
                at: 7.5,
                generation: 2
            })
        );
        assert_eq!((hex6.rating, hex6.stages.len()), (Some(312.5), 0));
        let hex8 = &view["hex8_2p"];
        assert_eq!(
            (hex8.generation, hex8.model_sha256.as_ref()),
            (Some(0), None)
        );
        assert_eq!((hex8.model_written_at, hex8.last_promotion), (None, None));
        assert_eq!(hex8.rating, None);
        // A changed model is hashed again; a removed one is gone from the view.
        std::fs::write(pipeline.canonical("hex6_2p"), b"better model").unwrap();
        daemon.refresh_models();
        assert_eq!(
            daemon.models["hex6_2p"].sha256,
            sha256::hex_of(b"better model")
        );
        std::fs::remove_file(pipeline.canonical("hex6_2p")).unwrap();
        daemon.refresh_models();
        assert!(daemon.models.is_empty());
    }

    #[test]
    fn events_are_checked_against_the_results_file() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = Pipeline::for_test(dir.path(), vec!["hex6_2p".into()]);
        let cands = pipeline.candidates_dir("hex6_2p");
        std::fs::create_dir_all(&cands).unwrap();
        let cand = cands.join("hex6_2p-1.bin");
        std::fs::write(&cand, b"model").unwrap();
        let real = r(0.3, None, 100);
        std::fs::write(
            eval_path(&cand),
            record_of(real.clone(), &cand, &sha256::hex_of(b"model")).to_string(),
        )
        .unwrap();
        let event = |path: &Path, random: f64| {
            json!({"config_key": "hex6_2p", "model_path": path.display().to_string(),
                   "win_rate_vs_random": random, "win_rate_vs_baseline": null, "games": 100})
        };
        let (c, record) = verify_event(&pipeline, "hex6_2p", &event(&cand, 0.3)).unwrap();
        assert_eq!((c, record.results), (cand.clone(), real));
        let err = verify_event(&pipeline, "hex6_2p", &event(&cand, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("disagree"), "{err}");
        // A file outside the candidates directory, and a symlink to it inside.
        let outside = dir.path().join("evil.bin");
        std::fs::write(&outside, b"secret").unwrap();
        let err = verify_event(&pipeline, "hex6_2p", &event(&outside, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is outside"), "{err}");
        let link = cands.join("evil.bin");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let err = verify_event(&pipeline, "hex6_2p", &event(&link, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("symlink"), "{err}");
        // A candidate without results, and a results file that names another model.
        let other = cands.join("hex6_2p-2.bin");
        std::fs::write(&other, b"model").unwrap();
        let err = verify_event(&pipeline, "hex6_2p", &event(&other, 0.3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no usable evaluation results"), "{err}");
        std::fs::copy(eval_path(&cand), eval_path(&other)).unwrap();
        let err = verify_event(&pipeline, "hex6_2p", &event(&other, 0.3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is the evaluation of"), "{err}");
        // results_path, when given, must be the candidate's own results file.
        let mut e = event(&cand, 0.3);
        e["results_path"] = eval_path(&other).display().to_string().into();
        let err = verify_event(&pipeline, "hex6_2p", &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not the results of"), "{err}");
    }

    #[test]
    fn decided_candidates_beyond_the_newest_are_deleted_with_their_results() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("models/candidates");
        let mut p = AutoPromotion {
            keep_candidates: 2,
            ..AutoPromotion::default()
        };
        for (key, name, at) in [
            ("hex8_2p", "a", 1.0),
            ("hex8_2p", "b", 2.0),
            ("hex8_2p", "c", 3.0),
            ("hex6_2p", "d", 0.5),
        ] {
            let model = keys.join(key).join(format!("{name}.bin"));
            std::fs::create_dir_all(model.parent().unwrap()).unwrap();
            std::fs::write(&model, b"m").unwrap();
            std::fs::write(eval_path(&model), b"{}").unwrap();
            p.state.decided.insert(
                model.display().to_string(),
                Decided {
                    promoted: false,
                    gate: None,
                    at,
                },
            );
        }
        let undecided = keys.join("hex8_2p/e.bin");
        std::fs::write(&undecided, b"m").unwrap();
        p.prune_candidates("hex8_2p");
        let a = keys.join("hex8_2p/a.bin");
        assert!(!a.exists() && !eval_path(&a).exists());
        assert!(!p.state.decided.contains_key(&a.display().to_string()));
        for kept in [
            "hex8_2p/b.bin",
            "hex8_2p/c.bin",
            "hex6_2p/d.bin",
            "hex8_2p/e.bin",
        ] {
            assert!(keys.join(kept).exists(), "{kept}");
        }
        assert_eq!(p.pruned, 2);
    }
}
