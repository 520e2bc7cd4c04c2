//! evaluation on a node in a cluster: candidates become items of the shared work queue, and any
//! node whose `cluster.roles` include `evaluation` plays them.
//!
//! - **Offering.** Every candidate on this node's disk without results is offered each cycle as
//!   an evaluation item ([`EvaluationSpec`]: key, this node, the candidate's path here and its
//!   SHA-256), queued once per candidate content (`unique` = `<node>.<sha256>`, checked by the
//!   server). An item set aside after its attempts is not offered again until the operator
//!   retries it (`queue retry`), or its dead-letter copy expires (30 days).
//! - **Playing one.** A node that claims an item of its own candidate plays it in place, as a
//!   single node does. A node that claims another node's fetches the candidate from that node's
//!   `data_address` (rsync over `pipeline.ssh`, or a local directory) into
//!   `models/evaluating/<node>/<key>/`, checks its SHA-256 against the item, fetches that node's
//!   canonical model the same way when the item names one (the baseline is the training node's,
//!   not whatever this node has), plays the gauntlet bound to the item (the claim lives as long as the job), and delivers the results file back
//!   beside the candidate there (verified by SHA-256 at the destination) before it announces
//!   EVALUATION_COMPLETED with `candidate_node`. So promotion, on the training node, reads the
//!   results from its own disk as always. While it copies, it tells the supervisor it is still
//!   at work on the item ([`WorkOp::Progress`]), so a slow copy is not taken for an idle claim;
//!   a refused progress (the claim was lost or cancelled) abandons the item at once.
//! - **Settling.** Success completes the item; a failed gauntlet, fetch or delivery hands it back
//!   after the retry delay (doubling), and its third failure sets it aside (WORK_FAILED); a
//!   candidate's node without a usable data address gets it handed back for another node
//!   without counting a failure (set aside after ten). An item whose candidate is gone, already
//!   evaluated or changed since it was queued, whose baseline is no longer the training node's
//!   canonical model, or whose training node is not in the cluster now, is completed without a
//!   gauntlet: the training node's offers come from its disk, so it offers the candidate afresh
//!   if it still waits.

use std::time::Duration;

use ringrift::protocol::{ClusterReport, WorkAnswer, WorkOp};
use ringrift::work_queue::{Attempt, Claimed, EVALUATION, EvaluationSpec};

use super::super::transfer::{self, FetchError, Target};
use super::super::work::{refused, work_failed};
use super::*;

/// How often a daemon copying an item's files tells its supervisor it is still at work on it.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// How long one copy of a candidate or its results may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(600);

/// Items claimed per cycle at most: the daemon reports between them.
const MAX_ITEMS_PER_CYCLE: usize = 8;

/// What became of a claimed evaluation item.
enum Outcome {
    /// Evaluated: the item is done.
    Evaluated,
    /// Nothing to play (gone, evaluated already, changed): the item is done.
    Nothing(String),
    /// The gauntlet, a copy or the results failed: back after a delay, set aside at the third.
    Failed(String),
    /// This node cannot run it at all: back for another node.
    HandBack(String),
    /// The claim was lost or cancelled while this node worked on it: nothing to settle.
    Lost(String),
}

/// Runs `work` while telling the supervisor every [`PROGRESS_EVERY`] that item `item` is still
/// being worked on. Err (and `work` dropped) when the supervisor says the item is no longer
/// this daemon's: its claim was lost or cancelled.
async fn with_progress<T>(
    ctx: &Ctx,
    item: i64,
    work: impl Future<Output = T>,
) -> Result<T, String> {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            _ = tick.tick() => {
                match ctx.work(WorkOp::Progress { item_id: item }).await {
                    WorkAnswer::Settled { .. } => {}
                    other => return Err(format!("{:#}", refused(other))),
                }
            }
        }
    }
}

/// A candidate file name safe as a word of a remote path (rsync's remote shell): letters,
/// digits, `.`, `_`, `-`, ending in `.bin`, not hidden.
fn plain_candidate_name(name: &str) -> bool {
    candidate_name(Path::new(name))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The files of one item of another node's candidate: fetched from `node` for item `id`.
struct ItemFetch<'a> {
    ctx: &'a Ctx,
    id: i64,
    ssh: &'a [String],
    node: &'a str,
}

impl ItemFetch<'_> {
    /// Fetches the file `name` of `from` to `dest`, checked against SHA-256 `want`
    /// ([`transfer::fetch_file`]), telling the supervisor meanwhile that this daemon is still at
    /// work on the item. None once it is there; else what becomes of the item: lost (the claim
    /// went), nothing to do (the file is gone or changed at its node since the item was queued:
    /// that node offers the candidate again if it still waits), or a failed attempt.
    async fn fetch(&self, from: &Target, name: &str, dest: &Path, want: &str) -> Option<Outcome> {
        let fetched = transfer::fetch_file(from, name, dest, want, COPY_TIMEOUT, self.ssh);
        let node = self.node;
        match with_progress(self.ctx, self.id, fetched).await {
            Ok(Ok(())) => None,
            Err(lost) => Some(Outcome::Lost(lost)),
            Ok(Err(e @ (FetchError::Missing { .. } | FetchError::Changed { .. }))) => {
                Some(Outcome::Nothing(format!(
                    "on node {node}, {e} (gone or changed since the item was queued)"
                )))
            }
            Ok(Err(e)) => Some(Outcome::Failed(format!(
                "cannot fetch {name} from node {node}: {e}"
            ))),
        }
    }
}

impl Evaluation {
    /// Offers this node's waiting candidates to the cluster, then plays the cluster's evaluation
    /// items while there are any (if this node evaluates).
    pub(super) async fn drain_shared(&mut self) {
        let root = self.pipeline.as_ref().expect("started").root.clone();
        let Some(view) = transfer::cluster_view(&root) else {
            self.last_error = Some("not on the cluster bus yet: nothing offered or claimed".into());
            return;
        };
        self.offer(&view.node_id).await;
        // Only a node with the evaluation role plays the cluster's items.
        if super::super::work::may_claim(&root, EVALUATION).is_err() {
            return;
        }
        for _ in 0..MAX_ITEMS_PER_CYCLE {
            let ctx = self.ctx.clone().expect("attached");
            let claim = WorkOp::Claim {
                item_type: EVALUATION.into(),
                max: 1,
            };
            let item = match ctx.work(claim).await {
                WorkAnswer::Claimed { items } => match items.into_iter().next() {
                    Some(item) => item,
                    None => break,
                },
                other => {
                    self.last_error = Some(format!("{:#}", refused(other)));
                    break;
                }
            };
            self.run_item(item, &view).await;
        }
    }

    /// The SHA-256 of `candidate`, hashed again only when its length or modification time
    /// changed.
    fn sha_of(&mut self, candidate: &Path) -> anyhow::Result<String> {
        let meta = std::fs::symlink_metadata(candidate)?;
        let stamp = (meta.len(), meta.modified()?);
        if let Some((len, mtime, sha)) = self.shas.get(candidate)
            && (*len, *mtime) == stamp
        {
            return Ok(sha.clone());
        }
        let sha = candidate_sha(candidate)?;
        self.shas
            .insert(candidate.to_path_buf(), (stamp.0, stamp.1, sha.clone()));
        Ok(sha)
    }

    /// Queues an evaluation item for each of this node's candidates without results (the server
    /// keeps one per candidate), quarantining one that does not load, as a single node does.
    async fn offer(&mut self, node: &str) {
        let pipeline = self.pipeline.clone().expect("started");
        let ctx = self.ctx.clone().expect("attached");
        // Offered before and evaluated since (here or on another node): say so.
        let done: Vec<(PathBuf, i64)> = self
            .offered
            .iter()
            .filter(|(c, _)| eval_path(c).exists() || !c.exists())
            .map(|(c, id)| (c.clone(), *id))
            .collect();
        for (c, id) in done {
            self.offered.remove(&c);
            if eval_path(&c).exists() {
                self.last_ok = true;
                self.last = format!(
                    "{} evaluated through the cluster (item {id}) at {}",
                    c.display(),
                    ringrift::timefmt::now_rfc3339()
                );
                println!("{NAME}: {}", self.last);
            }
        }
        let mut offered: Vec<PathBuf> = self.queue.iter().cloned().collect();
        offered.extend(self.set_aside.keys().cloned());
        self.shas.retain(|c, _| offered.contains(c));
        for candidate in offered {
            let Some(key) = candidate_key(&candidate) else {
                continue;
            };
            // Evaluated since the last scan (its item done): nothing to offer.
            if eval_path(&candidate).exists() || !candidate.exists() {
                continue;
            }
            let fresh = !self.shas.contains_key(&candidate);
            let sha = match self.sha_of(&candidate) {
                Ok(sha) => sha,
                Err(e) => {
                    self.last_error = Some(format!("cannot read {}: {e:#}", candidate.display()));
                    continue;
                }
            };
            if fresh && let Err(e) = pipeline.check_model(&candidate, &key) {
                self.quarantined += 1;
                let moved = quarantine(&candidate)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                self.fail(
                    &key,
                    &candidate,
                    format!("candidate does not load ({e:#}); quarantined as {moved}"),
                );
                continue;
            }
            let spec = EvaluationSpec {
                config_key: key.clone(),
                node: node.to_string(),
                model_path: candidate.display().to_string(),
                model_sha256: sha.clone(),
                baseline_sha256: sha256::file_hex(&pipeline.canonical(&key)).ok(),
            };
            let answer = ctx
                .work(WorkOp::Enqueue {
                    item_type: EVALUATION.into(),
                    config_key: key.clone(),
                    config: serde_json::to_value(&spec).ok(),
                    unique: Some(format!("{node}.{sha}")),
                })
                .await;
            match answer {
                WorkAnswer::Enqueued {
                    item_id: Some(id), ..
                } => {
                    self.set_aside.remove(&candidate);
                    self.offered.insert(candidate.clone(), id);
                    println!(
                        "{NAME}: {key}: evaluation item {id} queued for {}",
                        candidate.display()
                    );
                }
                WorkAnswer::Enqueued {
                    set_aside: Some(id),
                    ..
                } => {
                    self.offered.remove(&candidate);
                    if self.set_aside.insert(candidate.clone(), id).is_none() {
                        eprintln!(
                            "{NAME}: {key}: the evaluation of {} was set aside as work item {id}; `queue retry {id}` evaluates it again",
                            candidate.display()
                        );
                    }
                    self.queue.retain(|c| c != &candidate);
                }
                WorkAnswer::Enqueued { .. } => {
                    self.set_aside.remove(&candidate);
                }
                other => {
                    let e = format!("cannot offer {}: {:#}", candidate.display(), refused(other));
                    eprintln!("{NAME}: {e}");
                    self.last_error = Some(e);
                    return;
                }
            }
        }
    }

    /// Plays one claimed item and settles it.
    async fn run_item(&mut self, item: Claimed, view: &ClusterReport) {
        let pipeline = self.pipeline.clone().expect("started");
        let spec = item.evaluation_spec();
        let key = spec
            .as_ref()
            .map_or_else(|_| "unknown".to_string(), |s| s.config_key.clone());
        println!(
            "{NAME}: claimed evaluation item {} ({})",
            item.id, item.config
        );
        let outcome = match spec {
            Err(e) => Outcome::HandBack(format!("{e:#}")),
            Ok(s) if !pipeline.config_keys.contains(&s.config_key) => Outcome::HandBack(format!(
                "config key {} is not in pipeline.config_keys of node {}",
                s.config_key, view.node_id
            )),
            Ok(s) if s.node == view.node_id => self.run_own(item.id, &s).await,
            Ok(s) => self.run_remote(item.id, &s, view).await,
        };
        let ctx = self.ctx.clone().expect("attached");
        let (op, error) = match outcome {
            Outcome::Lost(why) => {
                eprintln!("{NAME}: evaluation item {}: abandoned: {why}", item.id);
                return;
            }
            Outcome::Evaluated => (WorkOp::Complete { item_id: item.id }, None),
            Outcome::Nothing(why) => {
                println!("{NAME}: evaluation item {}: {why}", item.id);
                (WorkOp::Complete { item_id: item.id }, None)
            }
            Outcome::Failed(error) => (
                WorkOp::Fail {
                    item_id: item.id,
                    error: error.clone(),
                    backoff_secs: self.retry_delay,
                },
                Some(error),
            ),
            Outcome::HandBack(reason) => {
                eprintln!("{NAME}: evaluation item {}: handed back: {reason}", item.id);
                (
                    WorkOp::Release {
                        item_id: item.id,
                        reason: reason.clone(),
                    },
                    Some(reason),
                )
            }
        };
        match ctx.work(op).await {
            WorkAnswer::Settled {
                attempt: Some(Attempt::Dead { attempts }),
            } => {
                let error = error.unwrap_or_default();
                eprintln!(
                    "{NAME}: evaluation item {} set aside after {attempts} attempts: {error}",
                    item.id
                );
                work_failed(&ctx, &pipeline, EVALUATION, item.id, &key, &error, attempts);
            }
            WorkAnswer::Settled { .. } => {}
            other => {
                let e = format!(
                    "cannot settle evaluation item {}: {:#}",
                    item.id,
                    refused(other)
                );
                eprintln!("{NAME}: {e}");
                self.last_error = Some(e);
            }
        }
    }

    /// An item of this node's own candidate: played in place.
    async fn run_own(&mut self, id: i64, spec: &EvaluationSpec) -> Outcome {
        let key = &spec.config_key;
        let dir = self.pipeline.as_ref().expect("started").candidates_dir(key);
        let candidate = match confined_file(&dir, Path::new(&spec.model_path)) {
            Ok(c) if c.parent() == Some(dir.as_path()) && candidate_name(&c) => c,
            Ok(_) => {
                return Outcome::HandBack(format!(
                    "{} is not a candidate (<name>.bin directly in {})",
                    spec.model_path,
                    dir.display()
                ));
            }
            Err(e) => return Outcome::Nothing(format!("no candidate to play: {e}")),
        };
        if eval_path(&candidate).exists() {
            return Outcome::Nothing(format!("{} is evaluated already", candidate.display()));
        }
        match candidate_sha(&candidate) {
            Ok(sha) if sha == spec.model_sha256 => {}
            Ok(_) => {
                return Outcome::Nothing(format!(
                    "{} changed since the item was queued (its content gets an item of its own)",
                    candidate.display()
                ));
            }
            Err(e) => return Outcome::Failed(format!("cannot read the candidate: {e:#}")),
        }
        let (results, baseline) = match self
            .gauntlet(key, &candidate, &spec.model_sha256, Some(id), None)
            .await
        {
            Ok(r) => r,
            Err(error) => {
                self.fail(key, &candidate, error.clone());
                return Outcome::Failed(error);
            }
        };
        let staging = staging_results(&candidate);
        if let Err(e) = publish_results(
            &candidate,
            &staging,
            &results,
            &spec.model_sha256,
            baseline.as_deref(),
        ) {
            let error = format!("cannot move {} into place: {e:#}", staging.display());
            self.fail(key, &candidate, error.clone());
            return Outcome::Failed(error);
        }
        self.announce(key, &candidate, &results);
        tokio::task::yield_now().await;
        Outcome::Evaluated
    }

    /// An item of another node's candidate: fetched, played here, its results delivered back.
    async fn run_remote(
        &mut self,
        id: i64,
        spec: &EvaluationSpec,
        view: &ClusterReport,
    ) -> Outcome {
        let pipeline = self.pipeline.clone().expect("started");
        let ctx = self.ctx.clone().expect("attached");
        let key = &spec.config_key;
        // Words of a path here: a node id as the config allows it, and a SHA-256 as hex.
        let hex = spec.model_sha256.len() == 64
            && spec
                .model_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ringrift::config::valid_node_id(&spec.node) || !hex {
            return Outcome::HandBack(format!(
                "node {:?} or model_sha256 {:?} is malformed",
                spec.node, spec.model_sha256
            ));
        }
        // A training node that is gone offers its waiting candidates again when it is back: the
        // item is done meanwhile, rather than handed round until it is set aside.
        let Some(origin) = view.nodes.iter().find(|n| n.record.node_id == spec.node) else {
            return Outcome::Nothing(format!(
                "node {} is not in the cluster now; it offers the candidate again when it is back",
                spec.node
            ));
        };
        let Some(addr) = origin
            .record
            .data_address
            .clone()
            .filter(|a| ringrift::config::valid_data_address(a))
        else {
            return Outcome::HandBack(format!(
                "node {} has no usable cluster.data_address to fetch its candidate from",
                spec.node
            ));
        };
        let name = Path::new(&spec.model_path)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .filter(|n| plain_candidate_name(n) && Path::new(&spec.model_path).is_absolute());
        let Some(name) = name else {
            return Outcome::HandBack(format!("{} names no candidate", spec.model_path));
        };
        let there = format!("{}/models/candidates/{key}", addr.trim_end_matches('/'));
        let target = transfer::parse_target(&there, &pipeline.root);
        let local_dir = pipeline
            .models_dir()
            .join("evaluating")
            .join(&spec.node)
            .join(key);
        let local = local_dir.join(&name);
        let baseline = local_dir.join(format!(".baseline-{name}"));
        let outcome = async {
            let files = ItemFetch {
                ctx: &ctx,
                id,
                ssh: &pipeline.ssh,
                node: &spec.node,
            };
            if let Some(o) = files
                .fetch(&target, &name, &local, &spec.model_sha256)
                .await
            {
                return o;
            }
            if let Err(e) = pipeline.check_model(&local, key) {
                return Outcome::Failed(format!("the candidate does not load: {e:#}"));
            }
            match pipeline.validate_model(&ctx, &local, key).await {
                Validation::NotConfigured | Validation::Valid => {}
                Validation::Invalid(why) | Validation::NotRun(why) => {
                    return Outcome::Failed(why);
                }
            }
            // The baseline is the training node's canonical model as the item names it.
            if let Some(want) = &spec.baseline_sha256 {
                let models = format!("{}/models", addr.trim_end_matches('/'));
                let source = transfer::parse_target(&models, &pipeline.root);
                let file = format!("canonical_{key}.bin");
                if let Some(o) = files.fetch(&source, &file, &baseline, want).await {
                    return o;
                }
            }
            let (results, baseline) = match self
                .gauntlet(key, &local, &spec.model_sha256, Some(id), Some(&baseline))
                .await
            {
                Ok(r) => r,
                Err(error) => return Outcome::Failed(error),
            };
            let results_file = eval_path(&local);
            if let Err(e) = write_results(
                &results_file,
                &staging_results(&local),
                &results,
                &spec.model_sha256,
                &spec.model_path,
                baseline.as_deref(),
            ) {
                return Outcome::Failed(format!("cannot write the results: {e:#}"));
            }
            let delivered = async {
                match &target {
                    Target::Local(dir) => {
                        let (file, dir) = (results_file.clone(), dir.clone());
                        tokio::task::spawn_blocking(move || transfer::copy_local(&file, &dir))
                            .await
                            .unwrap_or_else(|e| Err(anyhow::anyhow!("the copy panicked: {e}")))
                    }
                    Target::Remote { host, path } => {
                        transfer::copy_remote(
                            &results_file,
                            host,
                            path,
                            COPY_TIMEOUT,
                            &pipeline.ssh,
                        )
                        .await
                    }
                }
            };
            match with_progress(&ctx, id, delivered).await {
                Err(lost) => return Outcome::Lost(lost),
                Ok(Err(e)) => {
                    return Outcome::Failed(format!(
                        "cannot deliver the results to node {} ({there}): {e:#}",
                        spec.node
                    ));
                }
                Ok(Ok(_)) => {}
            }
            let results_path = eval_path(Path::new(&spec.model_path));
            self.remote += 1;
            self.announce_as(
                key,
                &spec.model_path,
                &results_path.display().to_string(),
                &results,
                Some(&spec.node),
            );
            tokio::task::yield_now().await;
            Outcome::Evaluated
        }
        .await;
        if let Outcome::Failed(error) = &outcome {
            self.fail(key, Path::new(&spec.model_path), error.clone());
        }
        // The copy is only for the gauntlet; the results live on the candidate's node.
        let _ = std::fs::remove_dir_all(&local_dir);
        if let Some(node_dir) = local_dir.parent() {
            // Only when empty: another key's copy may be there.
            let _ = std::fs::remove_dir(node_dir);
        }
        outcome
    }
}
