//! Cross-node events (issue 12, part 2): this node's cluster-wide events go out to the JetStream
//! stream `RINGRIFT_EVENTS`, and the other nodes' come in through this node's durable consumer.
//!
//! - **Out (the outbox).** The local event log is the outbox: a cursor (`data/cluster/outbox_seq`)
//!   says up to which sequence number this node's cluster-wide events
//!   (`ringrift::events::CLUSTER_WIDE`) are on the stream. Each is published with its event id as
//!   `Nats-Msg-Id` (the stream drops a duplicate within its window) and the cursor moves only
//!   once the stream acknowledged it. The outbox follows the core's event stream (as `events -f`
//!   does), so an event goes out as soon as it is logged. With the bus away, events wait in the
//!   log and go out when it is back: the local pipeline never waits for the bus.
//! - **In.** A durable pull consumer per node (`node-<id>`) takes every event published after it
//!   was first made, also those published while this node was down. Each event of another node
//!   goes to the core (`Msg::RemoteEvent`: provenance checked, logged, delivered, deduplicated by
//!   id) and is acknowledged (`double_ack`, CLUSTER-NOTES pitfall 5) once the core has it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use ringrift::events::Event;
use ringrift::protocol::{EventsRequest, FromSupervisor, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::core::{ConnTx, Msg, Requester};
use crate::logwriter::SupervisorLog;

/// The stream of cluster-wide events.
pub(crate) const STREAM: &str = "RINGRIFT_EVENTS";
/// How long the stream keeps events for nodes that are down.
const KEEP: Duration = Duration::from_secs(7 * 86_400);
/// How long an unacknowledged event waits before the stream delivers it again.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// What goes on the stream: the event as its node logged it, and that node.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    node: String,
    event: Event,
}

/// Makes (or finds) the stream; `replicas` as for the membership bucket.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    replicas: usize,
    log: &SupervisorLog,
) -> Result<(), String> {
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["ringrift.events.>".into()],
            max_age: KEEP,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot make the stream {STREAM}: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("cannot read the stream {STREAM}: {e}"))?;
    super::scale_up(js, &info.config, replicas, log).await;
    Ok(())
}

/// Starts the outbox and the inbox of this node.
pub(crate) fn start(
    js: jetstream::Context,
    node: String,
    root: PathBuf,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    leases: super::Bucket,
) {
    tokio::spawn(outbox(
        js.clone(),
        node.clone(),
        root,
        core.clone(),
        log.clone(),
    ));
    tokio::spawn(inbox(js, node, core, log, leases));
}

fn cursor_path(root: &Path) -> PathBuf {
    root.join("data/cluster/outbox_seq")
}

fn read_cursor(root: &Path) -> Option<u64> {
    std::fs::read_to_string(cursor_path(root))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_cursor(root: &Path, seq: u64) -> std::io::Result<()> {
    let path = cursor_path(root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{seq}\n"))?;
    std::fs::rename(tmp, path)
}

/// Sends the outbox's events to the stream, in order: the core's event stream of the
/// cluster-wide types from the cursor (the history page by page, then each new event as the core
/// logs it: no polling), each of this node's own events published until the stream has it.
async fn outbox(
    js: jetstream::Context,
    node: String,
    root: PathBuf,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) {
    let mut cursor = read_cursor(&root);
    let types: Vec<String> = ringrift::events::CLUSTER_WIDE
        .iter()
        .map(|t| t.to_string())
        .collect();
    while !core.is_closed() {
        // A stream cut off (its queue full while the bus was away) or a page boundary: ask again
        // from the cursor.
        let (tx, mut rx) = ConnTx::new(64 << 20);
        let (reply, mut answer) = oneshot::channel();
        let request = Request::Events(EventsRequest {
            // First time on this root: what the log held before the cluster was enabled stays
            // local (the answer's `last_seq` becomes the cursor).
            since: Some(cursor.unwrap_or(u64::MAX)),
            types: types.clone(),
            follow: true,
            limit: None,
        });
        let sent = core.send(Msg::Request {
            frame: request,
            reply,
            stream: Some(tx),
            from: Requester::Supervisor,
        });
        if sent.is_err() {
            return;
        }
        let mut answered = false;
        let (mut saved, mut published, mut written) = (cursor, false, Instant::now());
        loop {
            let frame = tokio::select! {
                bytes = rx.recv() => match bytes {
                    Some(b) => serde_json::from_slice::<FromSupervisor>(&b).ok(),
                    None => break,
                },
                a = &mut answer, if !answered => {
                    answered = true;
                    match a {
                        Ok(frame) => Some(frame),
                        // No answer: the stream follows.
                        Err(_) => continue,
                    }
                }
            };
            match frame {
                Some(FromSupervisor::Event { event }) => {
                    if event.node.is_none() {
                        publish(&js, &node, &event, &log).await;
                        published = true;
                    }
                    cursor = Some(event.seq);
                    // Not one write per event (each a file created and renamed, on the
                    // supervisor's only thread): after this node's own events, once no further
                    // event waits (a crash before it publishes them again; the stream drops them
                    // by id, and so would the other nodes); past other nodes' events, which
                    // only need skipping again, at most once a second.
                    if rx.is_empty() && (published || written.elapsed() >= Duration::from_secs(1)) {
                        note_cursor(&root, event.seq, &log);
                        (saved, published, written) = (cursor, false, Instant::now());
                    }
                }
                Some(FromSupervisor::EndOfEvents {
                    last_seq,
                    next_since,
                }) => {
                    if cursor.is_none() {
                        cursor = Some(last_seq);
                        note_cursor(&root, last_seq, &log);
                        saved = cursor;
                    }
                    if next_since.is_some() {
                        break; // one page of the history: the next from the cursor
                    }
                }
                // Refused (the supervisor is stopping) or not understood: ask again shortly.
                _ => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        if let Some(seq) = cursor
            && cursor != saved
        {
            note_cursor(&root, seq, &log);
        }
    }
}

/// Publishes one of this node's events, retrying every second until the stream has it.
async fn publish(js: &jetstream::Context, node: &str, ev: &Event, log: &SupervisorLog) {
    let subject = subject(node, &ev.event_type);
    let body: Vec<u8> = serde_json::to_vec(&Envelope {
        node: node.to_string(),
        event: ev.clone(),
    })
    .expect("an envelope serializes");
    let mut failing: Option<String> = None;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", ev.id.as_str());
        let sent = match js
            .publish_with_headers(subject.clone(), headers, body.clone().into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match sent {
            Ok(()) => {
                if failing.is_some() {
                    log.info("cluster: the outbox is flowing again");
                }
                return;
            }
            Err(e) => {
                if failing.is_none() {
                    log.warn(&format!(
                        "cluster: events wait in the outbox: cannot publish: {e}"
                    ));
                }
                failing = Some(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The subject of an event of `node`: `ringrift.events.<node>.<TYPE>`. The node in the subject
/// lets the bus's own permissions say who may publish as whom (a node's NATS user allowed to
/// publish on `ringrift.events.<its id>.>` only), and receivers check that the envelope names
/// the same node.
fn subject(node: &str, event_type: &str) -> String {
    format!("ringrift.events.{node}.{event_type}")
}

/// Why an event that came over the bus is not taken, if it is not:
/// - its envelope names another node than its subject;
/// - it comes from a cluster-scoped daemon without a fence (every such event a node sends carries
///   one), or with a fence on a lease its source does not act under;
/// - its token is beyond every revision the lease bucket has reached (forged: such a token would
///   make every node refuse the real leader), or is the lease's current revision while the
///   bucket names another holder.
///
/// An older token cannot be tied to its holder (the bucket keeps one revision per key, for the
/// TTL): it is taken, and the router refuses it if a higher one was seen for the lease.
async fn refusal(
    leases: &mut super::Bucket,
    subject: &str,
    env: &Envelope,
) -> Result<Option<String>, String> {
    if subject != self::subject(&env.node, &env.event.event_type) {
        return Ok(Some(format!(
            "it came on {subject}, not on the subject of node {}",
            env.node
        )));
    }
    let source = env.event.source.as_str();
    let Some(expected) = ringrift::catalog::event_lease(source, &env.event.payload) else {
        return Ok(None);
    };
    let Some(fence) = &env.event.fence else {
        return Ok(Some(format!(
            "{source} acts under a lease, and the event carries no fencing token"
        )));
    };
    if fence.lease != expected {
        return Ok(Some(format!(
            "its fence names the lease {}, which {source} does not act under here ({expected})",
            fence.lease
        )));
    }
    let reached = leases
        .stream
        .info()
        .await
        .map_err(|e| format!("cannot read the lease bucket: {e}"))?
        .state
        .last_sequence;
    if fence.token > reached {
        return Ok(Some(format!(
            "its fencing token {} is beyond every revision of the lease bucket ({reached}): forged",
            fence.token
        )));
    }
    let current = leases
        .store
        .entry(fence.lease.as_str())
        .await
        .map_err(|e| format!("cannot read the lease {}: {e}", fence.lease))?;
    if let Some(entry) = current
        && entry.revision == fence.token
        && let Ok(holder) = serde_json::from_slice::<super::lease::Holder>(&entry.value)
        && holder.node != env.node
    {
        return Ok(Some(format!(
            "revision {} of the lease {} is node {}'s, not node {}'s",
            fence.token, fence.lease, holder.node, env.node
        )));
    }
    Ok(None)
}

fn note_cursor(root: &Path, seq: u64, log: &SupervisorLog) {
    if let Err(e) = write_cursor(root, seq) {
        log.warn(&format!("cluster: cannot write the outbox cursor: {e}"));
    }
}

async fn inbox(
    js: jetstream::Context,
    node: String,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    mut leases: super::Bucket,
) {
    let durable = format!("node-{node}");
    let mut failing: Option<String> = None;
    loop {
        if core.is_closed() {
            return;
        }
        if let Err(e) = take_events(&js, &node, &durable, &core, &log, &mut leases).await {
            if failing.as_deref() != Some(e.as_str()) {
                log.warn(&format!("cluster: events from other nodes wait: {e}"));
            }
            failing = Some(e);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Takes events until an error: fetches of up to 64, each event to the core, then acknowledged.
async fn take_events(
    js: &jetstream::Context,
    node: &str,
    durable: &str,
    core: &mpsc::UnboundedSender<Msg>,
    log: &SupervisorLog,
    leases: &mut super::Bucket,
) -> Result<(), String> {
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| format!("cannot find the stream {STREAM}: {e}"))?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.to_string()),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::Explicit,
                // An event fetched by a process that died before acking comes back after this
                // (CLUSTER-NOTES pitfall 6); a live one acks in well under a millisecond.
                ack_wait: ACK_WAIT,
                filter_subject: "ringrift.events.>".into(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("cannot make the consumer {durable}: {e}"))?;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(64)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|e| format!("cannot fetch: {e}"))?;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| format!("cannot fetch: {e}"))?;
            let env = match serde_json::from_slice::<Envelope>(&msg.payload) {
                Ok(env) if env.node != node => Some(env),
                Ok(_) => None,
                Err(e) => {
                    log.warn(&format!(
                        "cluster: ignored a message on {}: not an event envelope: {e}",
                        msg.subject
                    ));
                    None
                }
            };
            let env = match env {
                Some(env) => match refusal(leases, msg.subject.as_str(), &env).await? {
                    Some(why) => {
                        log.warn(&format!(
                            "cluster: refused event {} from node {}: {why}",
                            env.event.id, env.node
                        ));
                        None
                    }
                    None => Some(env),
                },
                None => None,
            };
            if let Some(env) = env {
                let (reply, handled) = oneshot::channel();
                let taken = core
                    .send(Msg::RemoteEvent {
                        node: env.node,
                        event: env.event,
                        reply,
                    })
                    .is_ok()
                    && handled.await.is_ok();
                if !taken {
                    // The supervisor is stopping: the event goes back to the stream at once, for
                    // this node's next process.
                    let _ = msg
                        .ack_with(async_nats::jetstream::AckKind::Nak(None))
                        .await;
                    return Err("the supervisor is stopping".into());
                }
            }
            msg.double_ack()
                .await
                .map_err(|e| format!("cannot acknowledge: {e}"))?;
        }
    }
}
