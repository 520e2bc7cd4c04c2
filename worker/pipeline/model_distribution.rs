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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ringrift::config_key::ConfigKey;
use ringrift::events::{Event, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::sha256;
use super::{Pipeline, load_state, save_daemon_state, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::DistributionSettings;

const NAME: &str = "model_distribution";

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(Distribution::default())
}

/// Where models go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Local(PathBuf),
    /// `host:path`, copied with rsync over ssh.
    Remote {
        host: String,
        path: String,
    },
}

/// `host:path` (no `/` before the colon) is remote; anything else is a local directory, relative
/// paths taken from the root.
pub(super) fn parse_target(spec: &str, root: &Path) -> Target {
    if let Some((host, path)) = spec.split_once(':')
        && !host.is_empty()
        && !host.contains('/')
        && !spec.starts_with('.')
        && !spec.starts_with('~')
    {
        return Target::Remote {
            host: host.to_string(),
            path: path.to_string(),
        };
    }
    Target::Local(root.join(spec))
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

/// Copies `src` into directory `dir` as the same file name: temporary file, fsync, rename, then
/// checks the SHA-256 of what landed. Returns the hash.
pub(super) fn copy_local(src: &Path, dir: &Path) -> anyhow::Result<String> {
    let name = src
        .file_name()
        .context("model path has no name")?
        .to_string_lossy()
        .to_string();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let want = sha256::hex_of(&bytes);
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(&name);
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot rename into {}", dest.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let got =
        sha256::file_hex(&dest).with_context(|| format!("cannot read back {}", dest.display()))?;
    if got != want {
        bail!(
            "{} has SHA-256 {got} after copying, expected {want}",
            dest.display()
        );
    }
    Ok(want)
}

/// Single-quotes `s` for the remote shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs a command with a timeout; the child is killed if it overruns. Returns its stdout.
pub(super) async fn run(
    program: &str,
    args: &[String],
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => bail!("{program} timed out after {}s", timeout.as_secs_f64()),
        Ok(r) => r.with_context(|| format!("cannot run {program}"))?,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{program} failed ({}): {}", out.status, err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) const SSH_OPTS: &str = "ssh -o BatchMode=yes -o ConnectTimeout=10";

/// rsync to `host:path/`, then `sha256sum` there. Returns the hash.
pub(super) async fn copy_remote(
    src: &Path,
    host: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let name = src
        .file_name()
        .context("model path has no name")?
        .to_string_lossy()
        .to_string();
    let want = sha256::file_hex(src).with_context(|| format!("cannot read {}", src.display()))?;
    let dir = if path.is_empty() {
        "."
    } else {
        path.trim_end_matches('/')
    };
    let remote_file = format!("{dir}/{name}");
    let args = vec![
        "-a".to_string(),
        "--mkpath".to_string(),
        "-e".to_string(),
        SSH_OPTS.to_string(),
        src.display().to_string(),
        format!("{host}:{remote_file}"),
    ];
    run("rsync", &args, timeout).await?;
    let check = vec![
        "-o".to_string(),
        "BatchMode=yes".to_string(),
        "-o".to_string(),
        "ConnectTimeout=10".to_string(),
        host.to_string(),
        format!("sha256sum -- {}", shell_quote(&remote_file)),
    ];
    let out = run("ssh", &check, timeout).await?;
    let got = out.split_whitespace().next().unwrap_or_default();
    if got != want {
        bail!("{host}:{remote_file} has SHA-256 {got:?} after copying, expected {want}");
    }
    Ok(want)
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

/// Seconds before retry `attempt` (1-based) of a copy.
pub(super) fn retry_delay(attempt: u32, base: f64) -> f64 {
    base * f64::from(1u32 << attempt.saturating_sub(1).min(10))
}

/// Seconds before a target that failed `passes` whole passes in a row (each of `retries`
/// attempts) is tried again: it goes on doubling past the in-pass retries, up to an hour, so a dead
/// target is neither hammered every cycle nor given up on.
pub(super) fn pass_backoff(passes: u32, base: f64, retries: u32) -> f64 {
    let doublings = (retries + passes.saturating_sub(1)).min(20);
    (base.max(1.0) * f64::from(1u32 << doublings)).min(3600.0)
}

/// A target that failed for one model: when to try again.
#[derive(Debug, Clone)]
struct Failing {
    sha: String,
    failed_passes: u32,
    next_try: f64,
    error: String,
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
    targets: Vec<(String, Target)>,
    retries: u32,
    retry_backoff: f64,
    timeout: Duration,
    state: State,
    /// (target spec, config key) → the failure it is backing off from.
    failing: BTreeMap<(String, String), Failing>,
    last: String,
    ok: bool,
    last_error: Option<String>,
    passes: u64,
    copies: u64,
    copy_failures: u64,
    distributions: u64,
}

impl Distribution {
    fn report(&self) -> Report {
        let (healthy, status, message) = super::pass_health(
            !self.targets.is_empty(),
            "no targets configured: nothing to distribute",
            &self.last,
            self.ok,
        );
        Report::with_status(
            healthy,
            status,
            message,
            BTreeMap::from([
                (
                    "targets".to_string(),
                    json!(
                        self.targets
                            .iter()
                            .map(|(s, _)| s.clone())
                            .collect::<Vec<_>>()
                    ),
                ),
                ("delivered".to_string(), json!(self.state.delivered)),
                ("last_error".to_string(), json!(self.last_error)),
            ]),
            [
                ("passes", self.passes),
                ("copies", self.copies),
                ("copy_failures", self.copy_failures),
                ("distributions", self.distributions),
            ],
        )
    }

    /// One copy with retries; returns the verified hash or the last error.
    async fn copy_with_retries(&mut self, model: &Path, target: &Target) -> Result<String, String> {
        let mut last = String::new();
        for attempt in 1..=self.retries.max(1) {
            if attempt > 1 {
                let delay = retry_delay(attempt - 1, self.retry_backoff);
                tokio::time::sleep(Duration::from_secs_f64(delay)).await;
            }
            let result = match target {
                Target::Local(dir) => copy_local(model, dir),
                Target::Remote { host, path } => copy_remote(model, host, path, self.timeout).await,
            };
            match result {
                Ok(sha) => return Ok(sha),
                Err(e) => {
                    last = format!("{e:#}");
                    eprintln!(
                        "{NAME}: attempt {attempt} of {}: {last}",
                        self.retries.max(1)
                    );
                }
            }
        }
        Err(last)
    }

    /// Brings every target up to date with the canonical model of `only` (or all of them).
    async fn distribute(&mut self, only: Option<&str>) {
        self.passes += 1;
        if self.targets.is_empty() {
            return;
        }
        let pipeline = self.pipeline.clone().expect("started");
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
                if let Some(f) = self.failing.get(&(spec.clone(), key.clone()))
                    && f.sha == sha
                    && now < f.next_try
                {
                    // Still backing off from the last failed pass: counted, not retried yet.
                    failed += 1;
                    failures.push(format!(
                        "{key} → {spec}: {} (next try in {:.0}s)",
                        f.error,
                        f.next_try - now
                    ));
                    continue;
                }
                worked = true;
                match self.copy_with_retries(model, &target).await {
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
                        let passes = self
                            .failing
                            .get(&(spec.clone(), key.clone()))
                            .filter(|f| f.sha == sha)
                            .map_or(1, |f| f.failed_passes + 1);
                        let wait = pass_backoff(passes, self.retry_backoff, self.retries);
                        self.failing.insert(
                            (spec.clone(), key.clone()),
                            Failing {
                                sha: sha.clone(),
                                failed_passes: passes,
                                next_try: super::now_secs() + wait,
                                error: e,
                            },
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
        self.ok = failures.is_empty();
        self.last = if models.is_empty() {
            format!("pass at {when}: no canonical model yet")
        } else {
            format!(
                "pass at {when}: {in_sync} model copies in sync on {} target(s){}{}",
                self.targets.len(),
                if copied.is_empty() {
                    String::new()
                } else {
                    format!("; copied {}", copied.join(", "))
                },
                if failures.is_empty() {
                    String::new()
                } else {
                    format!("; FAILED {}", failures.join("; "))
                }
            )
        };
        if !failures.is_empty() {
            eprintln!("{NAME}: {}", self.last);
            self.last_error = Some(format!("{when} {}", failures.join("; ")));
        }
    }
}

impl Daemon for Distribution {
    fn name(&self) -> &str {
        NAME
    }

    fn attach(&mut self, ctx: Ctx) {
        self.ctx = Some(ctx);
    }

    fn subscriptions(&self) -> Vec<String> {
        vec!["MODEL_PROMOTED".into()]
    }

    fn start<'a>(
        &'a mut self,
        settings: &'a Settings,
    ) -> LocalBoxFuture<'a, anyhow::Result<Report>> {
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            let specs: Vec<String> = match settings.config.get("targets") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| {
                        t.as_str()
                            .map(str::to_string)
                            .context("targets must be a list of strings")
                    })
                    .collect::<anyhow::Result<_>>()?,
                Some(other) => bail!("targets must be a list of strings, not {other}"),
            };
            self.targets = specs
                .into_iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    let t = parse_target(&s, &pipeline.root);
                    (s, t)
                })
                .collect();
            let s = typed(settings, DistributionSettings::from_map)?;
            self.retries = s.retries;
            self.retry_backoff = s.retry_backoff.as_secs_f64();
            self.timeout = s.timeout;
            self.state = load_state(&pipeline.state_path(NAME));
            self.ok = true;
            println!(
                "{NAME}: targets {:?} ({} attempts, backoff {}s)",
                self.targets, self.retries, self.retry_backoff
            );
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
                eprintln!("{NAME}: {why}");
                self.last_error = Some(format!("{} {why}", ringrift::timefmt::now_rfc3339()));
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

    #[test]
    fn targets_are_local_dirs_or_host_paths() {
        let root = Path::new("/srv/rr");
        assert_eq!(
            parse_target("/mnt/models", root),
            Target::Local("/mnt/models".into())
        );
        assert_eq!(
            parse_target("shared/models", root),
            Target::Local("/srv/rr/shared/models".into())
        );
        assert_eq!(
            parse_target("./a:b", root),
            Target::Local("/srv/rr/./a:b".into())
        );
        assert_eq!(
            parse_target("gpu1:/data/models", root),
            Target::Remote {
                host: "gpu1".into(),
                path: "/data/models".into()
            }
        );
        assert_eq!(
            parse_target("me@gpu1:models", root),
            Target::Remote {
                host: "me@gpu1".into(),
                path: "models".into()
            }
        );
    }

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

    #[test]
    fn retries_back_off_exponentially_and_quoting_is_safe() {
        assert_eq!(retry_delay(1, 5.0), 5.0);
        assert_eq!(retry_delay(3, 5.0), 20.0);
        // Between passes: beyond the in-pass retries, capped at an hour.
        assert_eq!(pass_backoff(1, 5.0, 3), 40.0);
        assert_eq!(pass_backoff(2, 5.0, 3), 80.0);
        assert_eq!(pass_backoff(30, 5.0, 3), 3600.0);
        assert_eq!(pass_backoff(1, 0.0, 1), 2.0);
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }

    #[test]
    fn a_command_that_overruns_is_killed_and_a_failure_reported() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let err = run("sleep", &["5".into()], Duration::from_millis(100))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("timed out"), "{err}");
            let err = run("false", &[], Duration::from_secs(5)).await.unwrap_err();
            assert!(err.to_string().contains("false failed"), "{err}");
            assert_eq!(
                run("echo", &["hi".into()], Duration::from_secs(5))
                    .await
                    .unwrap(),
                "hi\n"
            );
        });
    }
}
