//! MODEL_DISTRIBUTION: copies every canonical model (models/canonical_<key>.bin, nothing else) to
//! the configured `targets`, and proves each copy with SHA-256.
//!
//! Why it is shaped this way:
//! - Reconciliation, not just events: MODEL_PROMOTED makes a copy happen at once, but every cycle
//!   also compares each target with the canonical models, so a missed event, a target that was down,
//!   or a copy someone damaged is repaired on the next cycle.
//! - A local target is a directory: the copy goes to a hidden temporary file, is fsynced and renamed
//!   into place (a reader never sees half a model), then hashed again. A `host:path` target is
//!   `rsync -a` over ssh (a child process with a timeout, killed if it overruns), verified with
//!   `sha256sum` over ssh; as hashing a remote file every cycle is costly, remote targets are
//!   re-checked only when the canonical model's hash differs from the one last delivered there.
//! - Each copy is retried `retries` times with an exponential backoff from `retry_backoff`; a target
//!   that still fails is counted in MODEL_DISTRIBUTION_COMPLETE's `failed` and in health, and is
//!   tried again next cycle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ringrift::config_key::ConfigKey;
use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::sha256;
use super::transfer::{Delivery, FailingMap, Passes, Purpose, Target, resolve, specs};
use super::{Pipeline, load_state, save_daemon_state, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::DistributionSettings;

const NAME: &str = "model_distribution";

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(Distribution::default())
}

/// The canonical models under `models`: (config key, path), sorted by key.
fn canonical_models(models: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(models) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let key = name
                .strip_prefix("canonical_")?
                .strip_suffix(".bin")?
                .to_string();
            // `DirEntry::file_type` does not follow symlinks: a link there is no canonical model.
            let regular = e.file_type().is_ok_and(|t| t.is_file());
            (key.parse::<ConfigKey>().is_ok() && regular).then(|| (key, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Does `target` need `model` (whose hash is `sha`)? Local: the copy is missing or differs.
/// Remote: the hash last delivered there differs.
fn needs_copy(target: &Target, model: &Path, sha: &str, delivered: Option<&String>) -> bool {
    match target {
        Target::Local(dir) => {
            let Some(name) = model.file_name() else {
                return false;
            };
            sha256::file_hex(&dir.join(name)).ok().as_deref() != Some(sha)
        }
        Target::Remote { .. } => delivered.map(String::as_str) != Some(sha),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Target spec → config key → SHA-256 last delivered and verified there.
    delivered: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Default)]
struct Distribution {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    /// `targets` as configured (`role:` entries included).
    configured: Vec<String>,
    /// The targets as last resolved (each pass resolves them again).
    targets: Vec<(String, Target)>,
    delivery: Delivery,
    state: State,
    /// (target spec, config key) → the failure it is backing off from.
    failing: FailingMap<String>,
    pass: Passes,
    copies: u64,
    copy_failures: u64,
    distributions: u64,
}

impl Distribution {
    fn report(&self) -> Report {
        self.pass.report(
            ("targets", &self.targets),
            &if self.configured.is_empty() {
                "no targets configured: nothing to distribute".to_string()
            } else {
                super::transfer::idle_message(
                    &self.configured,
                    "targets",
                    self.pipeline.as_ref().map(|p| p.root.as_path()),
                )
            },
            ("delivered", json!(self.state.delivered)),
            [
                ("copies", self.copies),
                ("copy_failures", self.copy_failures),
                ("distributions", self.distributions),
            ],
        )
    }

    /// Brings every target up to date with the canonical model of `only` (or all of them).
    async fn distribute(&mut self, only: Option<&str>) {
        self.pass.count += 1;
        let pipeline = self.pipeline.clone().expect("started");
        self.targets = resolve(&self.configured, &pipeline.root, Purpose::Models);
        if self.targets.is_empty() {
            return;
        }
        let models = canonical_models(&pipeline.root.join("models"));
        let mut in_sync = 0usize;
        let mut failures: Vec<String> = Vec::new();
        let mut copied: Vec<String> = Vec::new();
        for (key, model) in models.iter().filter(|(k, _)| only.is_none_or(|o| o == k)) {
            let sha = match sha256::file_hex(model) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("cannot hash {}: {e}", model.display()));
                    continue;
                }
            };
            let (mut succeeded, mut failed, mut worked) = (0u64, 0u64, false);
            for (spec, target) in self.targets.clone() {
                let delivered = self.state.delivered.get(&spec).and_then(|m| m.get(key));
                if !needs_copy(&target, model, &sha, delivered) {
                    succeeded += 1;
                    in_sync += 1;
                    self.failing.remove(&(spec.clone(), key.clone()));
                    continue;
                }
                let now = super::now_secs();
                if let Some(wait) = self
                    .failing
                    .get(&(spec.clone(), key.clone()))
                    .filter(|f| f.on == sha)
                    .and_then(|f| f.waiting(now, &format!("{key} → {spec}")))
                {
                    // Still backing off from the last failed pass: counted, not retried yet.
                    failed += 1;
                    failures.push(wait);
                    continue;
                }
                worked = true;
                let copied_to = self.delivery.deliver(NAME, model, &target).await;
                match copied_to {
                    Ok(got) => {
                        self.failing.remove(&(spec.clone(), key.clone()));
                        self.copies += 1;
                        succeeded += 1;
                        in_sync += 1;
                        copied.push(format!("{key} → {spec}"));
                        println!(
                            "{NAME}: copied {} to {spec} (sha256 {got})",
                            model.display()
                        );
                        self.state
                            .delivered
                            .entry(spec.clone())
                            .or_default()
                            .insert(key.clone(), got);
                        if let Err(e) = save_daemon_state(&pipeline, NAME, &self.state) {
                            failures.push(e.to_string());
                        }
                    }
                    Err(e) => {
                        self.copy_failures += 1;
                        failed += 1;
                        failures.push(format!("{key} → {spec}: {e}"));
                        self.delivery.record_failure(
                            &mut self.failing,
                            (&spec, key),
                            sha.clone(),
                            |a, b| a == b,
                            e.to_string(),
                        );
                    }
                }
            }
            if worked {
                self.distributions += 1;
                self.ctx.as_ref().expect("attached").emit(
                    "MODEL_DISTRIBUTION_COMPLETE",
                    payload([
                        ("config_key", key.as_str().into()),
                        ("targets", succeeded.into()),
                        ("model_path", model.display().to_string().into()),
                        ("failed", failed.into()),
                    ]),
                );
            }
        }
        let when = ringrift::timefmt::now_rfc3339();
        let mut parts = if models.is_empty() {
            vec![format!("pass at {when}: no canonical model yet")]
        } else {
            vec![format!(
                "pass at {when}: {in_sync} model copies in sync on {} target(s)",
                self.targets.len()
            )]
        };
        if !models.is_empty() && !copied.is_empty() {
            parts.push(format!("copied {}", copied.join(", ")));
        }
        self.pass.end(NAME, &when, parts, &failures);
    }
}

impl Daemon for Distribution {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["MODEL_PROMOTED".into()]
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            self.configured = specs(settings, "targets")?;
            self.targets = resolve(&self.configured, &pipeline.root, Purpose::Models);
            let s = typed(settings, DistributionSettings::from_map)?;
            self.delivery = Delivery {
                retries: s.retries,
                retry_backoff: s.retry_backoff.as_secs_f64(),
                timeout: s.timeout,
                ssh: pipeline.ssh.clone(),
            };
            self.state = load_state(&pipeline.state_path(NAME));
            self.pass.ok = true;
            println!("{NAME}: targets {:?} ({})", self.targets, self.delivery);
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.distribute(None).await;
            self.report()
        })
    }

    fn on_event(&mut self, event: Event) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            let key = event
                .payload
                .get("config_key")
                .and_then(Value::as_str)
                .map(str::to_string);
            let models = self.pipeline.as_ref().expect("started").models_dir();
            // Distribution copies the canonical models it finds itself; an event naming a model
            // elsewhere is not one of the pipeline's.
            if let Err(why) = Pipeline::check_event_path(&event, "model_path", &models) {
                super::note_error(&mut self.pass.last_error, NAME, &why.to_string());
                return Some(self.report());
            }
            self.distribute(key.as_deref()).await;
            Some(self.report())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::transfer::copy_local;

    #[test]
    fn only_canonical_models_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "canonical_hex8_2p.bin",
            "canonical_hex6_2p.bin",
            ".canonical_hex8_2p.tmp",
            "canonical_chess_2p.bin",
            "ringrift_best_hex8_2p",
            "other.bin",
        ] {
            std::fs::write(dir.path().join(name), b"m").unwrap();
        }
        let keys: Vec<String> = canonical_models(dir.path())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["hex6_2p", "hex8_2p"]);
    }

    #[test]
    fn local_copies_are_verified_and_repaired_when_they_differ() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("canonical_hex8_2p.bin");
        std::fs::write(&model, b"model bytes").unwrap();
        let target_dir = dir.path().join("target/models");
        let target = Target::Local(target_dir.clone());
        let sha = sha256::file_hex(&model).unwrap();
        assert!(needs_copy(&target, &model, &sha, None), "missing");
        assert_eq!(copy_local(&model, &target_dir).unwrap(), sha);
        assert!(!needs_copy(&target, &model, &sha, None));
        std::fs::write(target_dir.join("canonical_hex8_2p.bin"), b"damaged").unwrap();
        assert!(needs_copy(&target, &model, &sha, None), "differs");
        copy_local(&model, &target_dir).unwrap();
        assert_eq!(
            std::fs::read(target_dir.join("canonical_hex8_2p.bin")).unwrap(),
            b"model bytes"
        );
        let names: Vec<_> = std::fs::read_dir(&target_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn remote_targets_are_judged_by_the_last_delivered_hash() {
        let t = Target::Remote {
            host: "h".into(),
            path: "p".into(),
        };
        let m = Path::new("/x/canonical_hex8_2p.bin");
        assert!(needs_copy(&t, m, "abc", None));
        assert!(needs_copy(&t, m, "abc", Some(&"old".to_string())));
        assert!(!needs_copy(&t, m, "abc", Some(&"abc".to_string())));
    }
}
