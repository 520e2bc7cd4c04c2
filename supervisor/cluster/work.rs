//! The cluster's shared work queue (issue 13): selfplay, training and evaluation items in a JetStream work-queue stream that
//! every node of the cluster claims from, with the same contract as the single node's SQLite queue
//! (`ringrift::work_queue`): claim, complete, fail with a growing delay, set aside after
//! [`MAX_ATTEMPTS`] failures (the dead-letter stream, and WORK_FAILED from the daemon that ran it).
//!
//! The supervisor is the node's only NATS client: daemons ask through their own connection
//! ([`WorkOp`] frames), so a daemon needs no credentials and cannot reach the bus. Layout:
//!
//! - stream `RINGRIFT_WORK` (WorkQueue retention, file storage), subjects
//!   `ringrift.work.<type>.<config_key>` (an item queued once per candidate adds its words:
//!   `ringrift.work.evaluation.<key>.<node>.<sha256>`); one durable pull consumer per type (`work_<type>`, a
//!   single `filter_subject`: CLUSTER-NOTES pitfalls 3 and 4), explicit acks, `ack_wait` =
//!   `cluster.work_ack_wait`, no `max_deliver` (attempts are counted here, so that nothing is
//!   left behind by the server's own limit: pitfall in "What works");
//! - bucket `ringrift_attempts` (key = item id): the item's failed jobs and its hand-backs by
//!   nodes that cannot run it at all ([`WorkOp::Release`]), so that neither a node's death nor a
//!   node that does not play its key costs it an attempt;
//! - an item's id is its stream sequence number, which a redelivery keeps;
//! - bucket `ringrift_claims` (key = item id): which node and delivery holds each claimed item.
//!   The holder renews its record every third of `ack_wait` by compare-and-set, with a progress
//!   acknowledgement of the message; a failed compare-and-set means another node was given the
//!   item (this node was cut off for longer than `ack_wait`), and a holder that cannot confirm
//!   its record for two thirds of `ack_wait` gives the item up before the server redelivers it.
//!   Either way the item's job is stopped (`Msg::WorkLost`): never two nodes running one item;
//! - stream `RINGRIFT_WORK_DEAD` (limits retention, 30 days), subjects `ringrift.dead.<type>.<key>`:
//!   items whose last attempt failed (or that no node could run), with the error, the node and
//!   the attempts.
//!
//! A claimed item stays this node's while a job it started for the item runs, or the daemon that
//! claimed it is connected and starts one within `ack_wait` (or says it is still at work on it,
//! [`WorkOp::Progress`]); otherwise it is handed back at the
//! next renewal. An item whose node died comes back `ack_wait` after the node's last renewal.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use futures_util::StreamExt;
use ringrift::protocol::{ErrorCode, FromSupervisor, QueueRequest, WorkAnswer, WorkOp};
use ringrift::work_queue::{
    Attempt, Claimed, EVALUATION, Item, MAX_ATTEMPTS, MAX_RELEASES, SELFPLAY, SelfplaySpec,
    TRAINING,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::unix_now;
use crate::core::{ConnTx, Msg, Reply};
use crate::logwriter::SupervisorLog;

/// The work stream.
pub(crate) const STREAM: &str = "RINGRIFT_WORK";
/// The dead-letter stream.
pub(crate) const DEAD: &str = "RINGRIFT_WORK_DEAD";
/// The claims bucket.
pub(crate) const CLAIMS: &str = "ringrift_claims";
/// The bucket of failed attempts and hand-backs per item.
pub(crate) const ATTEMPTS: &str = "ringrift_attempts";
/// A handed-back item waits this long, so that nodes that cannot run it do not pass it round
/// and round.
const RELEASE_DELAY: Duration = Duration::from_secs(1);
/// How long a dead item is kept.
const KEEP_DEAD: Duration = Duration::from_secs(30 * 86_400);
/// A failed item's delay doubles per attempt up to this.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// At most this many items in one claim.
const MAX_CLAIM: u32 = 64;

/// What the core hands the work task.
pub(crate) enum Cmd {
    /// A daemon's [`WorkOp`]; the answer goes to its connection.
    Op {
        daemon: String,
        conn: ConnTx,
        request_id: u64,
        op: WorkOp,
    },
    /// Job `job` of `daemon`, for claimed item `item`, started (`running`) or ended.
    Job {
        item: i64,
        daemon: String,
        job: String,
        running: bool,
    },
    /// An operator's `queue ...`.
    Queue { req: QueueRequest, reply: Reply },
    /// The supervisor is exiting: hand every held item back now, then say so.
    Release(tokio::sync::oneshot::Sender<()>),
}

/// Where the core finds the work task once the node is on the bus.
pub(crate) type Slot = Arc<Mutex<Option<mpsc::UnboundedSender<Cmd>>>>;

/// An item as it sits in the work stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Body {
    item_type: String,
    config_key: String,
    priority: f64,
    /// What the item asks for (for selfplay, a [`SelfplaySpec`]), as JSON text.
    config: String,
    created_unix: f64,
    /// An item queued once per this, not per key ([`WorkOp::Enqueue`]): the last words of its
    /// subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unique: Option<String>,
}

impl Body {
    /// Its subject under `prefix` (`ringrift.work`, `ringrift.dead`): `<prefix>.<type>.<key>`,
    /// then `.<unique>` if it has one. Words that cannot name a subject are an error.
    fn subject(&self, prefix: &str) -> Result<String, String> {
        let mut s = format!(
            "{prefix}.{}.{}",
            token(&self.item_type)?,
            token(&self.config_key)?
        );
        if let Some(u) = &self.unique {
            for word in u.split('.') {
                s.push('.');
                s.push_str(token(word)?);
            }
        }
        Ok(s)
    }
}

/// An item as it sits in the dead-letter stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadBody {
    /// Its id in the work stream.
    id: i64,
    item: Body,
    error: String,
    attempts: i64,
    node: String,
    failed_unix: f64,
}

/// Who holds a claimed item (the claims bucket).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimRecord {
    node: String,
    daemon: String,
    /// The delivery this claim is (1 the first time).
    delivered: i64,
    /// When this node claimed it (renewals keep it): unix seconds.
    claimed_unix: f64,
    /// The item's type (records of older versions have none).
    #[serde(default)]
    item_type: String,
}

/// A claimed item this node holds.
struct Held {
    msg: jetstream::Message,
    daemon: String,
    conn: ConnTx,
    /// The job running it, if one does.
    job: Option<String>,
    /// Since when no job runs it (from the claim, or the end of its job); None while one does.
    idle_since: Option<Instant>,
    /// The claim record's revision (compare-and-set).
    revision: u64,
    /// When the claim record was last confirmed.
    confirmed: Instant,
    /// Its record as written at the claim.
    record: ClaimRecord,
    body: Body,
}

/// Starts the work task; `slot` is where the core finds it.
pub(crate) async fn start(
    js: jetstream::Context,
    node: String,
    ack_wait: Duration,
    replicas: usize,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    slot: Slot,
) -> Result<(), String> {
    let make = |name: &str, subjects: &str, retention, max_age| stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        retention,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let work = js
        .get_or_create_stream(make(
            STREAM,
            "ringrift.work.>",
            stream::RetentionPolicy::WorkQueue,
            Duration::ZERO,
        ))
        .await
        .map_err(|e| format!("cannot make the stream {STREAM}: {e}"))?;
    let dead = js
        .get_or_create_stream(make(
            DEAD,
            "ringrift.dead.>",
            stream::RetentionPolicy::Limits,
            KEEP_DEAD,
        ))
        .await
        .map_err(|e| format!("cannot make the stream {DEAD}: {e}"))?;
    // Claim records are fenced by compare-and-set, not by expiry: the bucket only sweeps
    // records nobody deletes (of items removed behind the supervisors' backs).
    let claims = super::kv_bucket(&js, CLAIMS, CLAIMS_MAX_AGE, replicas, "claims", &log)
        .await?
        .store;
    let attempts = super::kv_bucket(&js, ATTEMPTS, KEEP_DEAD, replicas, "attempts", &log)
        .await?
        .store;
    let mut task = Work {
        js,
        node,
        ack_wait,
        core,
        log,
        work,
        dead,
        claims,
        attempts,
        consumers: BTreeMap::new(),
        held: BTreeMap::new(),
    };
    // The consumers (one per item type) keep the ack_wait of the node that made them; that is
    // when the server redelivers, so it is what this node times its renewals and gives up by.
    let mut effective = ack_wait;
    for item_type in [SELFPLAY, TRAINING, EVALUATION] {
        let c = task.consumer(item_type).await?;
        let theirs = c.cached_info().config.ack_wait;
        if theirs != ack_wait {
            task.log.warn(&format!(
                "cluster: the consumer work_{item_type} redelivers after {}, not the {} of this \
                 node's work_ack_wait: the consumer's figure holds for the whole cluster (the node \
                 that made it chose it), and this node times its claims by it; set the same value \
                 on every node",
                humantime::format_duration(theirs),
                humantime::format_duration(ack_wait)
            ));
        }
        effective = effective.min(theirs.max(Duration::from_millis(300)));
    }
    task.ack_wait = effective;
    let (tx, rx) = mpsc::unbounded_channel();
    *slot.lock().expect("work slot lock") = Some(tx);
    tokio::spawn(task.run(rx));
    Ok(())
}

/// A listing reads at most this many of the newest items of each stream.
const SCAN_WINDOW: u64 = 2000;

/// The claims bucket's max age: longer than any job.
const CLAIMS_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

/// `s` as a subject token whatever it holds (for the dead-letter subject of an item whose key
/// came from the bus): characters other than `a-z0-9_-` become `_`.
fn safe_token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

struct Work {
    js: jetstream::Context,
    node: String,
    ack_wait: Duration,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    work: stream::Stream,
    dead: stream::Stream,
    claims: kv::Store,
    /// Failed attempts and hand-backs per item ([`Counts`]).
    attempts: kv::Store,
    consumers: BTreeMap<String, consumer::PullConsumer>,
    held: BTreeMap<i64, Held>,
}

/// What the attempts bucket keeps of an item that did not succeed yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counts {
    /// Jobs that failed (the item is set aside at [`MAX_ATTEMPTS`]).
    failures: i64,
    /// Nodes that could not run it at all (set aside at [`MAX_RELEASES`]).
    releases: i64,
}

/// `config_key` as a subject token: the keys are `[a-z0-9_]` (`ringrift::config_key`), anything
/// else is refused rather than escaped.
fn token(key: &str) -> Result<&str, String> {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Ok(key)
    } else {
        Err(format!("{key:?} cannot name a work subject"))
    }
}

/// The first sequence number of the newest `window` messages of `stream` (named `name`).
async fn window_start(stream: &stream::Stream, name: &str, window: u64) -> Result<u64, String> {
    let last = stream
        .clone()
        .info()
        .await
        .map_err(|e| format!("cannot read {name}: {e}"))?
        .state
        .last_sequence;
    Ok(last.saturating_sub(window).max(1))
}

/// The delay before attempt `attempts + 1` of an item that failed `attempts` times.
fn delay(backoff_secs: f64, attempts: i64) -> Duration {
    let secs = backoff_secs.max(0.0) * 2f64.powi((attempts - 1).clamp(0, 30) as i32);
    Duration::from_secs_f64(secs.min(MAX_DELAY.as_secs_f64()))
}

impl Work {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let period = (self.ack_wait / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(cmd) => self.handle(cmd).await,
                },
                _ = tick.tick() => {
                    if self.core.is_closed() {
                        return;
                    }
                    self.renew().await;
                }
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Op {
                daemon,
                conn,
                request_id,
                op,
            } => {
                let answer = match self.op(&daemon, &conn, op).await {
                    Ok(answer) => answer,
                    Err(message) => WorkAnswer::Refused { message },
                };
                let _ = conn.send(FromSupervisor::Work { request_id, answer });
            }
            Cmd::Job {
                item,
                daemon,
                job,
                running,
            } => {
                // Only the daemon holding the item binds a job to it, and only its bound job's
                // end unbinds it.
                if let Some(h) = self.held.get_mut(&item).filter(|h| h.daemon == daemon) {
                    if running {
                        h.job = Some(job);
                        h.idle_since = None;
                    } else if h.job.as_deref() == Some(job.as_str()) {
                        h.job = None;
                        h.idle_since = Some(Instant::now());
                    }
                }
            }
            Cmd::Release(done) => {
                let held = std::mem::take(&mut self.held);
                for (id, h) in held {
                    let _ = h.msg.ack_with(AckKind::Nak(None)).await;
                    self.drop_claim(id, h.revision).await;
                    self.log.info(&format!(
                        "cluster: work item {id} handed back: this supervisor is exiting"
                    ));
                }
                let _ = done.send(());
            }
            Cmd::Queue { req, reply } => {
                let counts = if matches!(req, QueueRequest::List { .. }) {
                    self.counts().await
                } else {
                    BTreeMap::new()
                };
                let answer = match self.queue(req).await {
                    Ok(items) => FromSupervisor::QueueItems { items, counts },
                    Err((code, message)) => FromSupervisor::Error { code, message },
                };
                let _ = reply.send(answer);
            }
        }
    }

    async fn op(&mut self, daemon: &str, conn: &ConnTx, op: WorkOp) -> Result<WorkAnswer, String> {
        match op {
            WorkOp::Claim { item_type, max } => {
                let items = self
                    .claim(daemon, conn, &item_type, max.clamp(1, MAX_CLAIM))
                    .await?;
                Ok(WorkAnswer::Claimed { items })
            }
            WorkOp::Complete { item_id } => {
                let h = self.take(daemon, item_id)?;
                h.msg
                    .double_ack()
                    .await
                    .map_err(|e| format!("cannot acknowledge work item {item_id}: {e}"))?;
                self.drop_claim(item_id, h.revision).await;
                let _ = self.attempts.delete(item_id.to_string()).await;
                Ok(WorkAnswer::Settled { attempt: None })
            }
            WorkOp::Fail {
                item_id,
                error,
                backoff_secs,
            } => {
                let h = self.take(daemon, item_id)?;
                self.settle_failure(h, item_id, error, Some(backoff_secs))
                    .await
            }
            WorkOp::Release { item_id, reason } => {
                let h = self.take(daemon, item_id)?;
                self.settle_failure(h, item_id, reason, None).await
            }
            WorkOp::TopUp {
                target,
                games_per_item,
                weights,
            } => self.top_up(target, games_per_item, &weights).await,
            WorkOp::Reap { older_than_secs } => Ok(WorkAnswer::Reaped {
                items: self.reap(&older_than_secs).await?,
            }),
            WorkOp::Enqueue {
                item_type,
                config_key,
                config,
                unique,
            } => self.enqueue(&item_type, &config_key, config, unique).await,
            WorkOp::Progress { item_id } => match self.held.get_mut(&item_id) {
                Some(h) if h.daemon == daemon => {
                    if h.job.is_none() {
                        h.idle_since = Some(Instant::now());
                    }
                    Ok(WorkAnswer::Settled { attempt: None })
                }
                _ => Err(format!(
                    "work item {item_id} is not claimed by {daemon} on this node (its claim was \
                     lost, or it was settled or cancelled)"
                )),
            },
        }
    }

    /// Queues an item of `item_type` for `key` (and `unique`) unless one is outstanding, or one
    /// with the same `unique` was set aside.
    async fn enqueue(
        &mut self,
        item_type: &str,
        key: &str,
        config: Option<serde_json::Value>,
        unique: Option<String>,
    ) -> Result<WorkAnswer, String> {
        let config = match config {
            None => serde_json::json!({ "config_key": key }).to_string(),
            Some(c @ serde_json::Value::Object(_)) => c.to_string(),
            Some(_) => return Err("an item's config must be a JSON object".into()),
        };
        if config.len() > ringrift::protocol::MAX_ITEM_CONFIG {
            return Err(format!(
                "an item's config is {} bytes, more than {}",
                config.len(),
                ringrift::protocol::MAX_ITEM_CONFIG
            ));
        }
        let body = Body {
            item_type: item_type.to_string(),
            config_key: key.to_string(),
            priority: 0.0,
            config,
            created_unix: unix_now(),
            unique,
        };
        let subject = body.subject("ringrift.work")?;
        // One that failed for good stays set aside until the operator says otherwise.
        if body.unique.is_some() {
            match self
                .dead
                .get_last_raw_message_by_subject(&body.subject("ringrift.dead")?)
                .await
            {
                Ok(m) => {
                    let id = serde_json::from_slice::<DeadBody>(&m.payload)
                        .map_or(m.sequence as i64, |d| d.id);
                    return Ok(WorkAnswer::Enqueued {
                        item_id: None,
                        set_aside: Some(id),
                    });
                }
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(format!("cannot read {DEAD}: {e}")),
            }
        }
        // Queued only if the subject has no message now, checked by the server as it stores it
        // (one item per key: two nodes asking at once cannot both queue one).
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let published = self
            .js
            .publish_with_headers(
                subject,
                headers,
                serde_json::to_vec(&body).expect("serializes").into(),
            )
            .await
            .map_err(|e| format!("cannot queue work: {e}"))?
            .await;
        let ack = match published {
            Ok(ack) => ack,
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                return Ok(WorkAnswer::Enqueued {
                    item_id: None,
                    set_aside: None,
                });
            }
            Err(e) => return Err(format!("cannot queue work: {e}")),
        };
        self.log.info(&format!(
            "cluster: work item {} ({item_type} {key}) queued",
            ack.sequence
        ));
        Ok(WorkAnswer::Enqueued {
            item_id: Some(ack.sequence as i64),
            set_aside: None,
        })
    }

    /// Deletes the claim record of every item claimed longer ago than its type's limit.
    async fn reap(&self, older_than_secs: &BTreeMap<String, f64>) -> Result<Vec<i64>, String> {
        let mut keys = self
            .claims
            .keys()
            .await
            .map_err(|e| format!("cannot list the claims: {e}"))?;
        let now = unix_now();
        let mut reaped = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            let Ok(Some(entry)) = self.claims.entry(key.clone()).await else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<ClaimRecord>(&entry.value) else {
                continue;
            };
            let Ok(id) = key.parse::<i64>() else { continue };
            let Some(older_than_secs) = older_than_secs.get(&record.item_type).copied() else {
                continue;
            };
            if now - record.claimed_unix > older_than_secs
                && self
                    .claims
                    .delete_expect_revision(&key, Some(entry.revision))
                    .await
                    .is_ok()
            {
                self.log.warn(&format!(
                    "cluster: work item {id} has been claimed by {} for {:.0}s, more than the \
                     {older_than_secs:.0}s any job of it may run: its claim is taken away and it \
                     will be delivered again",
                    record.node,
                    now - record.claimed_unix
                ));
                reaped.push(id);
            }
        }
        Ok(reaped)
    }

    /// A failed attempt (`backoff_secs` given) or a hand-back by a node that cannot run the item
    /// (None): counted in the attempts bucket; the item goes back with a delay, or is set aside
    /// after [`MAX_ATTEMPTS`] failures or [`MAX_RELEASES`] hand-backs.
    async fn settle_failure(
        &mut self,
        h: Held,
        item_id: i64,
        error: String,
        backoff_secs: Option<f64>,
    ) -> Result<WorkAnswer, String> {
        let key = item_id.to_string();
        let mut counts: Counts = match self.attempts.get(&key).await {
            Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_default(),
            _ => Counts::default(),
        };
        let (dead, wait, attempts) = match backoff_secs {
            Some(backoff) => {
                counts.failures += 1;
                let n = counts.failures;
                (n >= MAX_ATTEMPTS, delay(backoff, n), n)
            }
            None => {
                counts.releases += 1;
                let n = counts.releases;
                (n >= MAX_RELEASES, RELEASE_DELAY, counts.failures)
            }
        };
        if !dead {
            // A count not written is one attempt more for the item, never one less for its node.
            let _ = self
                .attempts
                .put(
                    &key,
                    serde_json::to_vec(&counts).expect("serializes").into(),
                )
                .await;
            h.msg
                .ack_with(AckKind::Nak(Some(wait)))
                .await
                .map_err(|e| format!("cannot hand work item {item_id} back: {e}"))?;
            self.drop_claim(item_id, h.revision).await;
            return Ok(WorkAnswer::Settled {
                attempt: Some(Attempt::Retry {
                    attempts,
                    at: unix_now() + wait.as_secs_f64(),
                }),
            });
        }
        let (error, attempts) = match backoff_secs {
            Some(_) => (error, attempts),
            None => (
                format!(
                    "no node could run it ({} hand-backs); the last said: {error}",
                    counts.releases
                ),
                counts.releases,
            ),
        };
        let dead = DeadBody {
            id: item_id,
            item: h.body.clone(),
            error,
            attempts,
            node: self.node.clone(),
            failed_unix: unix_now(),
        };
        // An item from the bus may carry words no subject can have: set aside under safe ones.
        let subject = h.body.subject("ringrift.dead").unwrap_or_else(|_| {
            format!(
                "ringrift.dead.{}.{}",
                safe_token(&h.body.item_type),
                safe_token(&h.body.config_key)
            )
        });
        let sent = async {
            self.js
                .publish(
                    subject,
                    serde_json::to_vec(&dead).expect("serializes").into(),
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = sent {
            // Not set aside: it comes back (and fails again, and is set aside then).
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
            self.drop_claim(item_id, h.revision).await;
            return Err(format!(
                "cannot set work item {item_id} aside in {DEAD}: {e}; it is handed back"
            ));
        }
        h.msg
            .double_ack()
            .await
            .map_err(|e| format!("cannot remove work item {item_id}: {e}"))?;
        self.drop_claim(item_id, h.revision).await;
        let _ = self.attempts.delete(&key).await;
        self.log.warn(&format!(
            "cluster: work item {item_id} ({} {}) set aside in {DEAD} after {attempts} {}: {}",
            h.body.item_type,
            h.body.config_key,
            if backoff_secs.is_some() {
                "failed attempts"
            } else {
                "hand-backs"
            },
            dead.error
        ));
        Ok(WorkAnswer::Settled {
            attempt: Some(Attempt::Dead { attempts }),
        })
    }

    /// The held item `id`, if `daemon` holds it.
    fn take(&mut self, daemon: &str, id: i64) -> Result<Held, String> {
        match self.held.get(&id) {
            Some(h) if h.daemon == daemon => Ok(self.held.remove(&id).expect("present")),
            _ => Err(format!(
                "work item {id} is not claimed by {daemon} on this node (its claim was lost, or \
                 it was settled or cancelled)"
            )),
        }
    }

    async fn drop_claim(&self, id: i64, revision: u64) {
        let _ = self
            .claims
            .delete_expect_revision(id.to_string(), Some(revision))
            .await;
    }

    async fn consumer(&mut self, item_type: &str) -> Result<consumer::PullConsumer, String> {
        if let Some(c) = self.consumers.get(item_type) {
            return Ok(c.clone());
        }
        let name = format!("work_{}", token(item_type)?);
        let c = self
            .work
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("ringrift.work.{item_type}.>"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("cannot make the consumer {name}: {e}"))?;
        self.consumers.insert(item_type.to_string(), c.clone());
        Ok(c)
    }

    async fn claim(
        &mut self,
        daemon: &str,
        conn: &ConnTx,
        item_type: &str,
        max: u32,
    ) -> Result<Vec<Claimed>, String> {
        let consumer = self.consumer(item_type).await?;
        let mut batch = consumer
            .fetch()
            .max_messages(max as usize)
            .messages()
            .await
            .map_err(|e| format!("cannot claim work: {e}"))?;
        let mut claimed = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    self.log.warn(&format!("cluster: claiming work: {e}"));
                    break;
                }
            };
            let Ok((id, delivered)) = msg.info().map(|i| (i.stream_sequence as i64, i.delivered))
            else {
                continue;
            };
            let body: Body = match serde_json::from_slice(&msg.payload) {
                Ok(b) => b,
                Err(e) => {
                    // Nobody can run it: out of the queue, said once in the log.
                    self.log.warn(&format!(
                        "cluster: work item {id} on {} is unreadable ({e}): removed",
                        msg.subject
                    ));
                    let _ = msg.double_ack().await;
                    continue;
                }
            };
            let record = ClaimRecord {
                node: self.node.clone(),
                daemon: daemon.to_string(),
                delivered,
                claimed_unix: unix_now(),
                item_type: body.item_type.clone(),
            };
            let put = self.claims.put(
                id.to_string(),
                serde_json::to_vec(&record).expect("serializes").into(),
            );
            let revision = match put.await {
                Ok(r) => r,
                Err(e) => {
                    // Without its record the claim cannot be fenced: not taken.
                    self.log.warn(&format!(
                        "cluster: cannot record the claim of work item {id}: {e}; handed back"
                    ));
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
            };
            self.log.info(&format!(
                "cluster: work item {id} ({} {}) claimed by {daemon}{}",
                body.item_type,
                body.config_key,
                if delivered > 1 {
                    format!(" (delivered again: delivery {delivered})")
                } else {
                    String::new()
                }
            ));
            let failures = match self.attempts.get(id.to_string()).await {
                Ok(Some(b)) => {
                    serde_json::from_slice::<Counts>(&b)
                        .unwrap_or_default()
                        .failures
                }
                _ => 0,
            };
            claimed.push(Claimed {
                id,
                item_type: body.item_type.clone(),
                priority: body.priority,
                config: body.config.clone(),
                attempts: failures,
            });
            self.held.insert(
                id,
                Held {
                    msg,
                    daemon: daemon.to_string(),
                    conn: conn.clone(),
                    job: None,
                    idle_since: Some(Instant::now()),
                    revision,
                    confirmed: Instant::now(),
                    record,
                    body,
                },
            );
        }
        Ok(claimed)
    }

    /// Every third of `ack_wait`: keeps each held item's claim, or lets it go. An item goes back
    /// at once when no job runs it and the daemon that claimed it is gone, or has not run it for
    /// a whole `ack_wait` (it claimed more than it started). The renewals run side by side, each
    /// bounded by a third of `ack_wait`, so a slow bus delays none past its deadline.
    async fn renew(&mut self) {
        let ack_wait = self.ack_wait;
        let idle: Vec<(i64, &'static str)> = self
            .held
            .iter()
            .filter(|(_, h)| h.job.is_none())
            .filter_map(|(id, h)| {
                if h.conn.is_closed() {
                    Some((
                        *id,
                        "the process that claimed it is gone and no job runs it",
                    ))
                } else if h.idle_since.is_some_and(|t| t.elapsed() > ack_wait) {
                    Some((
                        *id,
                        "the daemon that claimed it has not run it for work_ack_wait",
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in idle {
            let h = self.held.remove(&id).expect("listed");
            self.log.info(&format!(
                "cluster: work item {id} ({} {}) handed back: {why} ({})",
                h.body.item_type, h.body.config_key, h.daemon
            ));
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
            self.drop_claim(id, h.revision).await;
        }
        let budget = ack_wait / 3;
        let claims = &self.claims;
        let renewals = self.held.iter().map(|(id, h)| async move {
            let _ = tokio::time::timeout(budget, h.msg.ack_with(AckKind::Progress)).await;
            let renewed = tokio::time::timeout(
                budget,
                claims.update(
                    id.to_string(),
                    serde_json::to_vec(&h.record).expect("serializes").into(),
                    h.revision,
                ),
            )
            .await;
            (*id, renewed)
        });
        let results = futures_util::future::join_all(renewals).await;
        for (id, renewed) in results {
            let h = self.held.get_mut(&id).expect("listed");
            let lost = match renewed {
                Ok(Ok(revision)) => {
                    h.revision = revision;
                    h.confirmed = Instant::now();
                    None
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Some(
                    "another node was given it (this node did not renew its claim in time), or \
                     it was cancelled"
                        .to_string(),
                ),
                Ok(Err(_)) | Err(_) if h.confirmed.elapsed() > ack_wait * 2 / 3 => Some(format!(
                    "its claim could not be confirmed for {:.1}s (two thirds of work_ack_wait): \
                     the bus may already have given it to another node",
                    h.confirmed.elapsed().as_secs_f64()
                )),
                _ => None,
            };
            if let Some(why) = lost {
                let h = self.held.remove(&id).expect("listed");
                self.log.warn(&format!(
                    "cluster: work item {id} ({} {}) is no longer this node's: {why}",
                    h.body.item_type, h.body.config_key
                ));
                let _ = self.core.send(Msg::WorkLost { item: id });
            }
        }
    }

    async fn top_up(
        &mut self,
        target: u64,
        games_per_item: u64,
        weights: &BTreeMap<String, f64>,
    ) -> Result<WorkAnswer, String> {
        let mut outstanding = self
            .outstanding(&format!("ringrift.work.{SELFPLAY}.>"))
            .await?;
        let plan = ringrift::work_queue::allocate(weights, &outstanding, target);
        let mut added = BTreeMap::new();
        for (key, n) in plan {
            let subject = format!("ringrift.work.{SELFPLAY}.{}", token(&key)?);
            let config = serde_json::to_string(&SelfplaySpec {
                config_key: key.clone(),
                games: games_per_item,
            })
            .expect("serializes");
            for _ in 0..n {
                let body = Body {
                    item_type: SELFPLAY.into(),
                    config_key: key.clone(),
                    priority: weights.get(&key).copied().unwrap_or(0.0),
                    config: config.clone(),
                    created_unix: unix_now(),
                    unique: None,
                };
                self.js
                    .publish(
                        subject.clone(),
                        serde_json::to_vec(&body).expect("serializes").into(),
                    )
                    .await
                    .map_err(|e| format!("cannot queue work: {e}"))?
                    .await
                    .map_err(|e| format!("cannot queue work: {e}"))?;
                *added.entry(key.clone()).or_insert(0) += 1;
                *outstanding.entry(key.clone()).or_insert(0) += 1;
            }
        }
        Ok(WorkAnswer::ToppedUp { added, outstanding })
    }

    /// Items queued or running on the subjects `filter` matches, per config key (the stream's
    /// count per subject).
    async fn outstanding(&self, filter: &str) -> Result<BTreeMap<String, u64>, String> {
        let mut subjects = self
            .work
            .info_with_subjects(filter)
            .await
            .map_err(|e| format!("cannot count queued work: {e}"))?;
        let mut counts = BTreeMap::new();
        while let Some(entry) = subjects.next().await {
            let (subject, n) = entry.map_err(|e| format!("cannot count queued work: {e}"))?;
            if let Some(key) = subject.rsplit('.').next() {
                counts.insert(key.to_string(), n as u64);
            }
        }
        Ok(counts)
    }

    // ---- the operator's view

    async fn queue(&mut self, req: QueueRequest) -> Result<Vec<Item>, (ErrorCode, String)> {
        let failed = |e: String| (ErrorCode::Failed, e);
        match req {
            QueueRequest::List { status, limit } => {
                let mut items = Vec::new();
                let want = |s: &str| status.as_deref().is_none_or(|w| w == s);
                if want("pending") || want("running") {
                    let live = self.scan_work().await.map_err(failed)?;
                    for wanted in ["pending", "running"] {
                        if want(wanted) {
                            items.extend(
                                live.iter()
                                    .rev()
                                    .filter(|i| i.status == wanted)
                                    .take(limit as usize)
                                    .cloned(),
                            );
                        }
                    }
                }
                if want("failed") {
                    let dead = self.scan_dead(Some(SCAN_WINDOW)).await.map_err(failed)?;
                    items.extend(dead.into_iter().rev().map(|(_, i)| i).take(limit as usize));
                }
                Ok(items)
            }
            QueueRequest::Show { id } => Ok(vec![self.find(id).await?.1]),
            QueueRequest::Retry { id } => {
                let (where_, item) = self.find(id).await?;
                let Place::Dead(dead_seq, body) = where_ else {
                    return Err(wrong(id, &item.status, "failed"));
                };
                let subject = body.item.subject("ringrift.work").map_err(failed)?;
                let fresh = Body {
                    created_unix: unix_now(),
                    ..body.item.clone()
                };
                let ack = self
                    .js
                    .publish(
                        subject,
                        serde_json::to_vec(&fresh).expect("serializes").into(),
                    )
                    .await
                    .map_err(|e| failed(format!("cannot queue work item {id} again: {e}")))?
                    .await
                    .map_err(|e| failed(format!("cannot queue work item {id} again: {e}")))?;
                self.dead.delete_message(dead_seq).await.map_err(|e| {
                    failed(format!(
                        "queued again, but cannot remove it from {DEAD}: {e}"
                    ))
                })?;
                self.log.info(&format!(
                    "cluster: work item {id} queued again by the operator as item {}",
                    ack.sequence
                ));
                Ok(vec![item_of(
                    ack.sequence as i64,
                    &fresh,
                    "pending",
                    0,
                    None,
                )])
            }
            QueueRequest::Cancel { id } => {
                let (where_, mut item) = self.find(id).await?;
                if !matches!(where_, Place::Work) {
                    return Err(wrong(id, &item.status, "pending or running"));
                }
                self.work
                    .delete_message(id as u64)
                    .await
                    .map_err(|e| failed(format!("cannot cancel work item {id}: {e}")))?;
                // Its holder (this node or another) finds its record gone and stops the job.
                let _ = self.claims.delete(id.to_string()).await;
                let _ = self.attempts.delete(id.to_string()).await;
                self.log.info(&format!(
                    "cluster: work item {id} cancelled by the operator"
                ));
                item.status = "cancelled".into();
                item.completed_at = Some(unix_now());
                Ok(vec![item])
            }
        }
    }

    /// Where item `id` is, and what it looks like.
    async fn find(&self, id: i64) -> Result<(Place, Item), (ErrorCode, String)> {
        let not_found = || (ErrorCode::BadRequest, format!("no work item {id}"));
        if id <= 0 {
            return Err(not_found());
        }
        match self.work.get_raw_message(id as u64).await {
            Ok(m) => {
                let body: Body = serde_json::from_slice(&m.payload).map_err(|e| {
                    (
                        ErrorCode::Failed,
                        format!("work item {id} is unreadable: {e}"),
                    )
                })?;
                let item = self.live_item(id, &body).await;
                return Ok((Place::Work, item));
            }
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err((ErrorCode::Failed, format!("cannot read {STREAM}: {e}"))),
        }
        let dead = self
            .scan_dead(None)
            .await
            .map_err(|e| (ErrorCode::Failed, e))?;
        dead.into_iter()
            .find(|(_, i)| i.id == id)
            .ok_or_else(not_found)
    }

    async fn live_item(&self, id: i64, body: &Body) -> Item {
        live_item_of(id, body, self.claim_of(id, unix_now()).await.as_ref())
    }

    /// Item `id`'s claim record, with whether it lapsed at `now`: not renewed for
    /// `work_ack_wait`, so its holder is gone and the item goes to the next node that claims it
    /// (the record stays until then).
    async fn claim_of(&self, id: i64, now: f64) -> Option<(ClaimRecord, bool)> {
        let entry = self.claims.entry(id.to_string()).await.ok().flatten()?;
        let record = serde_json::from_slice::<ClaimRecord>(&entry.value).ok()?;
        let renewed = entry.created.unix_timestamp_nanos() as f64 / 1e9;
        Some((record, now - renewed > self.ack_wait.as_secs_f64()))
    }

    /// How many items are pending, running and failed in the whole queue.
    async fn counts(&self) -> BTreeMap<String, u64> {
        let messages = |s: &stream::Stream| {
            let mut s = s.clone();
            async move { s.info().await.map(|i| i.state.messages).unwrap_or(0) }
        };
        let outstanding = messages(&self.work).await;
        let failed = messages(&self.dead).await;
        let running = self
            .claim_records()
            .await
            .values()
            .filter(|(_, lapsed)| !lapsed)
            .count() as u64;
        BTreeMap::from([
            ("pending".to_string(), outstanding.saturating_sub(running)),
            ("running".to_string(), running),
            ("failed".to_string(), failed),
        ])
    }

    /// Every claim record by item id (as many as items run in the cluster), with whether it
    /// lapsed ([`Work::claim_of`]).
    async fn claim_records(&self) -> BTreeMap<i64, (ClaimRecord, bool)> {
        let mut out = BTreeMap::new();
        let Ok(mut keys) = self.claims.keys().await else {
            return out;
        };
        let now = unix_now();
        while let Some(Ok(key)) = keys.next().await {
            let Ok(id) = key.parse::<i64>() else { continue };
            if let Some(claim) = self.claim_of(id, now).await {
                out.insert(id, claim);
            }
        }
        out
    }

    /// The newest [`SCAN_WINDOW`] items of the work stream, oldest first: a listing reads no
    /// more than that, however long the queue (it runs in the task that renews the claims).
    async fn scan_work(&self) -> Result<Vec<Item>, String> {
        let mut seq = window_start(&self.work, STREAM, SCAN_WINDOW).await?;
        let claims = self.claim_records().await;
        let mut items = Vec::new();
        while (items.len() as u64) < SCAN_WINDOW {
            let Some(m) = next_message(&self.work, "ringrift.work.>", seq).await? else {
                break;
            };
            seq = m.sequence + 1;
            if let Ok(body) = serde_json::from_slice::<Body>(&m.payload) {
                let id = m.sequence as i64;
                items.push(live_item_of(id, &body, claims.get(&id)));
            }
        }
        Ok(items)
    }

    /// The dead items, oldest first: the newest `window` of them, or all.
    async fn scan_dead(&self, window: Option<u64>) -> Result<Vec<(Place, Item)>, String> {
        let mut items = Vec::new();
        let mut seq = match window {
            None => 1,
            Some(w) => window_start(&self.dead, DEAD, w).await?,
        };
        loop {
            let Some(m) = next_message(&self.dead, "ringrift.dead.>", seq).await? else {
                break;
            };
            seq = m.sequence + 1;
            if let Ok(dead) = serde_json::from_slice::<DeadBody>(&m.payload) {
                let mut item = item_of(
                    dead.id,
                    &dead.item,
                    "failed",
                    dead.attempts,
                    Some(dead.error.clone()),
                );
                item.completed_at = Some(dead.failed_unix);
                item.node = Some(dead.node.clone());
                items.push((Place::Dead(m.sequence, dead), item));
            }
        }
        Ok(items)
    }
}

/// The first message of `stream` at or after `seq` on a subject `filter` matches (None past the
/// last).
async fn next_message(
    stream: &stream::Stream,
    filter: &str,
    seq: u64,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, String> {
    match stream
        .raw_message_builder()
        .sequence(seq)
        .next_by_subject(filter)
        .send()
        .await
    {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!(
            "cannot read {}: {e}",
            stream.cached_info().config.name
        )),
    }
}

/// Where an item was found.
enum Place {
    /// In the work stream (pending or running).
    Work,
    /// In the dead-letter stream, at this sequence.
    Dead(u64, DeadBody),
}

fn wrong(id: i64, status: &str, allowed: &str) -> (ErrorCode, String) {
    (
        ErrorCode::Failed,
        format!("work item {id} is {status}: this applies only to an item that is {allowed}"),
    )
}

/// An item of the work stream: running where its claim record says, else pending.
fn live_item_of(id: i64, body: &Body, claim: Option<&(ClaimRecord, bool)>) -> Item {
    match claim {
        Some((c, true)) => item_of(
            id,
            body,
            "pending",
            c.delivered,
            Some(format!(
                "the claim of {}/{} lapsed (not renewed for work_ack_wait): it goes to the next \
                 node that claims it",
                c.node, c.daemon
            )),
        ),
        Some((c, false)) => {
            let mut item = item_of(id, body, "running", c.delivered.saturating_sub(1), None);
            item.claimed_at = Some(c.claimed_unix);
            item.claimed_by = Some(format!("{}/{}", c.node, c.daemon));
            item.node = Some(c.node.clone());
            item
        }
        None => item_of(id, body, "pending", 0, None),
    }
}

fn item_of(id: i64, body: &Body, status: &str, attempts: i64, error: Option<String>) -> Item {
    Item {
        id,
        item_type: body.item_type.clone(),
        priority: body.priority,
        config: serde_json::from_str(&body.config)
            .unwrap_or_else(|_| serde_json::Value::String(body.config.clone())),
        status: status.into(),
        attempts,
        created_at: body.created_unix,
        claimed_at: None,
        completed_at: None,
        claimed_by: None,
        error,
        node: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_items_subject_has_its_unique_words_and_refuses_odd_ones() {
        let mut body = Body {
            item_type: EVALUATION.into(),
            config_key: "hex8_2p".into(),
            priority: 0.0,
            config: "{}".into(),
            created_unix: 0.0,
            unique: None,
        };
        assert_eq!(
            body.subject("ringrift.work").unwrap(),
            "ringrift.work.evaluation.hex8_2p"
        );
        body.unique = Some("node-b.0a1f".into());
        assert_eq!(
            body.subject("ringrift.dead").unwrap(),
            "ringrift.dead.evaluation.hex8_2p.node-b.0a1f"
        );
        for odd in ["node-b.*", "node-b..x", "a.>", "", "A.b", "a b"] {
            body.unique = Some(odd.into());
            assert!(body.subject("ringrift.work").is_err(), "{odd:?}");
        }
    }

    #[test]
    fn a_failed_item_waits_twice_as_long_each_time_up_to_an_hour() {
        assert_eq!(delay(30.0, 1), Duration::from_secs(30));
        assert_eq!(delay(30.0, 2), Duration::from_secs(60));
        assert_eq!(delay(30.0, 40), MAX_DELAY);
        assert_eq!(delay(-1.0, 1), Duration::ZERO);
    }

    #[test]
    fn only_plain_keys_name_subjects() {
        assert_eq!(token("hex8_2p"), Ok("hex8_2p"));
        assert!(token("a.b").is_err());
        assert!(token("*").is_err());
        assert!(token("").is_err());
    }
}
