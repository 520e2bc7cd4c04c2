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
//! - The swap: verify the candidate loads, copy the current canonical to models/backup/, copy the
//!   candidate to a temporary file, fsync, verify it, and rename it over canonical_<key>.bin; then
//!   point ringrift_best_<key> at it by renaming a fresh symlink over the old one. Each step is
//!   atomic, so a crash at any point leaves the old or the new model, never a mix; and a re-run after
//!   a crash recognises (by SHA-256) a candidate that is already canonical.
//! - Decided candidates are kept in the state file; each cycle scans `*.eval.json` files for
//!   undecided ones, so a lost EVALUATION_COMPLETED only delays a decision.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::evaluation::{Results, candidate_key, candidates, eval_path, read_results};
use super::export::quarantine;
use super::sha256;
use super::{Pipeline, load_state, now_secs, num, save_daemon_state};
use crate::daemons::{Daemon, LocalBoxFuture, Report};
use crate::runtime::{Ctx, Settings};

const NAME: &str = "auto_promotion";

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
) -> Verdict {
    if r.win_rate_vs_random < t.min_vs_random {
        return Verdict::Reject {
            gate: "win_rate_vs_random",
            value: r.win_rate_vs_random,
            threshold: t.min_vs_random,
        };
    }
    if canonical_exists {
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

/// Copies `from` to `to` through `tmp` in the same directory: write, fsync, rename, fsync the dir.
fn copy_atomic(from: &Path, tmp: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        anyhow::ensure!(
            sha256::file_hex(tmp)? == sha256::hex_of(&bytes),
            "{} differs from {} after copying",
            tmp.display(),
            from.display()
        );
        std::fs::rename(tmp, to)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result?;
    if let Some(dir) = to.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Points `link` at `target` (a name relative to the link's directory) by renaming a fresh symlink
/// over it. Does nothing if it already points there.
fn point_link(link: &Path, target: &str) -> anyhow::Result<bool> {
    if std::fs::read_link(link).is_ok_and(|t| t == Path::new(target)) {
        return Ok(false);
    }
    let name = link
        .file_name()
        .context("link has no name")?
        .to_string_lossy();
    let tmp = link.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("cannot create symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, link)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), link.display()))?;
    Ok(true)
}

/// Where a promotion puts things.
struct Layout {
    canonical: PathBuf,
    best_link: PathBuf,
    backup_dir: PathBuf,
}

/// Makes `candidate` the canonical model of `key`. Returns the backup of the previous canonical
/// model, if there was one (none either when there was no canonical model or when the candidate
/// already is the canonical model, after a crash between the swap and the state file).
fn swap_in(
    candidate: &Path,
    key: &str,
    l: &Layout,
    unix_ms: u64,
) -> anyhow::Result<Option<PathBuf>> {
    let models = l
        .canonical
        .parent()
        .context("canonical path has no directory")?;
    std::fs::create_dir_all(models)?;
    let mut backup = None;
    let already =
        l.canonical.exists() && sha256::file_hex(&l.canonical)? == sha256::file_hex(candidate)?;
    if !already {
        if l.canonical.exists() {
            std::fs::create_dir_all(&l.backup_dir)?;
            let to = l.backup_dir.join(format!("canonical_{key}-{unix_ms}.bin"));
            let tmp = l.backup_dir.join(format!(".canonical_{key}-{unix_ms}.tmp"));
            copy_atomic(&l.canonical, &tmp, &to).context("cannot back up the canonical model")?;
            backup = Some(to);
        }
        let tmp = models.join(format!(".canonical_{key}.tmp"));
        copy_atomic(candidate, &tmp, &l.canonical).context("cannot install the candidate")?;
    }
    let target = l
        .canonical
        .file_name()
        .context("canonical path has no name")?
        .to_string_lossy()
        .to_string();
    point_link(&l.best_link, &target)?;
    Ok(backup)
}

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

#[derive(Default)]
struct AutoPromotion {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    thresholds: Option<Thresholds>,
    state: State,
    last: String,
    ok: bool,
    last_error: Option<String>,
    decisions: u64,
    promotions: u64,
    rejections: u64,
    errors: u64,
    reevaluations: u64,
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
        Report::new(
            self.ok,
            message,
            BTreeMap::from([
                ("canonical".to_string(), Value::Object(canonical)),
                ("decided".to_string(), Value::from(self.state.decided.len())),
                ("last_error".to_string(), json!(self.last_error)),
            ]),
            [
                ("decisions", self.decisions),
                ("promotions", self.promotions),
                ("rejections", self.rejections),
                ("promotion_errors", self.errors),
                ("reevaluations", self.reevaluations),
            ],
        )
    }

    fn save(&mut self) {
        let pipeline = self.pipeline.as_ref().expect("started");
        if let Err(msg) = save_daemon_state(pipeline, NAME, &self.state) {
            eprintln!("{NAME}: {msg}");
            self.last_error = Some(msg);
            self.ok = false;
        }
    }

    fn record(&mut self, candidate: &Path, promoted: bool, gate: Option<&str>) {
        self.decisions += 1;
        self.state.decided.insert(
            candidate.display().to_string(),
            Decided {
                promoted,
                gate: gate.map(str::to_string),
                at: now_secs(),
            },
        );
        self.save();
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
        self.ctx.as_ref().expect("attached").emit(
            "PROMOTION_REJECTED",
            payload([
                ("config_key", key.into()),
                ("model_path", candidate.display().to_string().into()),
                ("gate", gate.into()),
                ("value", value.into()),
                ("threshold", threshold.into()),
            ]),
        );
    }

    /// Decides one evaluated candidate (once).
    fn consider(&mut self, candidate: &Path, results: &Results) {
        let id = candidate.display().to_string();
        if self.state.decided.contains_key(&id) {
            return;
        }
        let Some(key) = candidate_key(candidate) else {
            println!("{NAME}: ignoring {id}: not a candidate under models/candidates/<key>/");
            return;
        };
        if !candidate.exists() {
            println!("{NAME}: {id} is gone (quarantined or deleted): nothing to decide");
            return;
        }
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
        let t = self.thresholds.expect("started");
        let last = self.state.last_promotion_at.get(&key).copied();
        match decide(results, &t, canonical_ok, now_secs(), last) {
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
                let results_path = eval_path(candidate);
                let mut stale = results_path.clone().into_os_string();
                stale.push(".stale");
                match std::fs::rename(&results_path, &stale) {
                    Ok(()) => {
                        self.reevaluations += 1;
                        self.state.reevaluated.push(id.clone());
                        self.save();
                        self.last = format!(
                            "{id}: evaluated without a baseline but {} exists now: sent back for evaluation",
                            canonical.display()
                        );
                        println!("{NAME}: {}", self.last);
                    }
                    Err(e) => self.error(format!(
                        "cannot set aside stale results {}: {e}",
                        results_path.display()
                    )),
                }
            }
            Verdict::Promote => self.promote(&pipeline, &key, candidate, results),
        }
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        self.ok = false;
        eprintln!("{NAME}: {message}");
        self.last_error = Some(format!("{} {message}", ringrift::timefmt::now_rfc3339()));
        self.last = message;
    }

    fn promote(&mut self, pipeline: &Pipeline, key: &str, candidate: &Path, results: &Results) {
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
        let backup = match swap_in(candidate, key, &layout, ms) {
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
        self.state
            .last_promotion_at
            .insert(key.to_string(), now_secs());
        self.record(candidate, true, None);
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
            ]),
        );
    }

    /// Decides every evaluated, undecided candidate on disk, and repairs best-model links.
    fn reconcile(&mut self) {
        let pipeline = self.pipeline.clone().expect("started");
        for candidate in candidates(&pipeline.root.join("models/candidates")) {
            let results_path = eval_path(&candidate);
            if !results_path.exists()
                || self
                    .state
                    .decided
                    .contains_key(&candidate.display().to_string())
            {
                continue;
            }
            match read_results(&results_path, 0) {
                Ok(results) => self.consider(&candidate, &results),
                // Evaluation's business: it quarantines unusable results and evaluates again.
                Err(e) => eprintln!("{NAME}: skipping {}: {e:#}", results_path.display()),
            }
        }
        for key in &pipeline.config_keys {
            let canonical = pipeline.canonical(key);
            if canonical.exists()
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

    fn attach(&mut self, ctx: Ctx) {
        self.ctx = Some(ctx);
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["EVALUATION_COMPLETED".into()]
    }

    fn start<'a>(
        &'a mut self,
        settings: &'a Settings,
    ) -> LocalBoxFuture<'a, anyhow::Result<Report>> {
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let t = Thresholds {
                min_vs_random: num(settings, "min_win_rate_vs_random", 0.6),
                min_vs_baseline: num(settings, "min_win_rate_vs_baseline", 0.55),
                min_games: num(settings, "min_games", 100.0).max(0.0) as u64,
                cooldown: num(settings, "cooldown", 0.0).max(0.0),
            };
            println!("{NAME}: gates {t:?}");
            self.thresholds = Some(t);
            self.state = load_state(&pipeline.state_path(NAME));
            self.ok = true;
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.reconcile();
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            let p = &event.payload;
            let candidate = PathBuf::from(
                p.get("model_path")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            );
            let results = Results {
                win_rate_vs_random: p
                    .get("win_rate_vs_random")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                win_rate_vs_baseline: p.get("win_rate_vs_baseline").and_then(Value::as_f64),
                games: p.get("games").and_then(Value::as_u64).unwrap_or(0),
            };
            self.consider(&candidate, &results);
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use ringrift::game::GameConfig;
    use ringrift::game::model::Model;

    use super::*;

    const T: Thresholds = Thresholds {
        min_vs_random: 0.6,
        min_vs_baseline: 0.55,
        min_games: 50,
        cooldown: 100.0,
    };

    fn r(random: f64, baseline: Option<f64>, games: u64) -> Results {
        Results {
            win_rate_vs_random: random,
            win_rate_vs_baseline: baseline,
            games,
        }
    }

    fn gate(v: Verdict) -> Option<&'static str> {
        match v {
            Verdict::Reject { gate, .. } => Some(gate),
            _ => None,
        }
    }

    #[test]
    fn the_first_failing_gate_is_named() {
        assert_eq!(
            decide(&r(0.9, Some(0.6), 100), &T, true, 1000.0, None),
            Verdict::Promote
        );
        assert_eq!(
            decide(&r(0.5, Some(0.1), 10), &T, true, 1000.0, None),
            Verdict::Reject {
                gate: "win_rate_vs_random",
                value: 0.5,
                threshold: 0.6
            }
        );
        assert_eq!(
            gate(decide(&r(0.9, Some(0.5), 10), &T, true, 1000.0, None)),
            Some("win_rate_vs_baseline")
        );
        assert_eq!(
            gate(decide(&r(0.9, Some(0.6), 10), &T, true, 1000.0, None)),
            Some("min_games")
        );
        assert_eq!(
            decide(&r(0.9, Some(0.6), 50), &T, true, 1000.0, Some(950.0)),
            Verdict::Reject {
                gate: "cooldown",
                value: 50.0,
                threshold: 100.0
            }
        );
        assert_eq!(
            decide(&r(0.9, Some(0.6), 50), &T, true, 1000.0, Some(900.0)),
            Verdict::Promote
        );
    }

    #[test]
    fn without_a_canonical_model_only_the_random_gate_applies() {
        assert_eq!(
            decide(&r(0.6, None, 50), &T, false, 0.0, None),
            Verdict::Promote
        );
        assert_eq!(
            decide(&r(0.6, Some(0.0), 50), &T, false, 0.0, None),
            Verdict::Promote
        );
        assert_eq!(
            decide(&r(0.6, None, 50), &T, true, 0.0, None),
            Verdict::Stale
        );
    }

    fn model(config: &GameConfig, bias: f32) -> Vec<u8> {
        let mut m = Model::zeros(config);
        let states = vec![1.0; m.num_features()];
        m.train(&states, &[bias], &Default::default());
        m.to_bytes()
    }

    #[test]
    fn swap_backs_up_replaces_atomically_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let models = dir.path().join("models");
        let cand_dir = models.join("candidates/hex6_2p");
        std::fs::create_dir_all(&cand_dir).unwrap();
        let l = Layout {
            canonical: models.join("canonical_hex6_2p.bin"),
            best_link: models.join("ringrift_best_hex6_2p"),
            backup_dir: models.join("backup"),
        };
        let first = cand_dir.join("hex6_2p-1.bin");
        std::fs::write(&first, model(&config, 1.0)).unwrap();
        assert_eq!(swap_in(&first, "hex6_2p", &l, 1).unwrap(), None);
        assert_eq!(
            std::fs::read(&l.canonical).unwrap(),
            std::fs::read(&first).unwrap()
        );
        assert_eq!(
            std::fs::read_link(&l.best_link).unwrap(),
            Path::new("canonical_hex6_2p.bin")
        );
        Model::load(&l.best_link, &config).unwrap();

        let second = cand_dir.join("hex6_2p-2.bin");
        std::fs::write(&second, model(&config, -1.0)).unwrap();
        let backup = swap_in(&second, "hex6_2p", &l, 2).unwrap().unwrap();
        assert_eq!(backup, l.backup_dir.join("canonical_hex6_2p-2.bin"));
        assert_eq!(
            std::fs::read(&backup).unwrap(),
            std::fs::read(&first).unwrap()
        );
        assert_eq!(
            std::fs::read(&l.canonical).unwrap(),
            std::fs::read(&second).unwrap()
        );
        // Re-running after a crash: already canonical, no second backup.
        assert_eq!(swap_in(&second, "hex6_2p", &l, 3).unwrap(), None);
        let leftovers: Vec<_> = std::fs::read_dir(&models)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_broken_link_is_repointed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ringrift_best_hex6_2p");
        std::os::unix::fs::symlink("elsewhere.bin", &link).unwrap();
        assert!(point_link(&link, "canonical_hex6_2p.bin").unwrap());
        assert!(!point_link(&link, "canonical_hex6_2p.bin").unwrap());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("canonical_hex6_2p.bin")
        );
    }
}
