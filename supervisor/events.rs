//! The event router: durable, at-least-once delivery of typed events between daemon processes.
//!
//! Every accepted event is appended to `data/events/events.log` (one JSON line, with its sequence
//! number and id) *before* it is delivered. Subscribers are known by daemon name, not by
//! connection: each one's subscribed types and last acked sequence number are kept in
//! `data/events/subscribers.json`, so a daemon that restarts is sent everything it has not acked,
//! including what was emitted while it was down. Each subscriber has a bounded window of events in
//! flight; a slow one only grows its own backlog (shown in `status`), it never delays the others.
//!
//! Memory is bounded whatever the load: only a compact index of the retained events is kept
//! (`store`), bodies are read back from the log when needed, payloads are capped
//! ([`ringrift::events::MAX_PAYLOAD_BYTES`]) and a query answers one page at a time ([`MAX_PAGE`]
//! events, [`MAX_PAGE_BYTES`]). Damaged files are moved aside at start-up (`recovery`).

mod recovery;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringrift::events::{self, Event};
use ringrift::protocol::{EventsInfo, FromSupervisor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::ConnTx;
pub(crate) use recovery::OpenError;
use store::{ALL_TYPES, AppendError, Store};

/// Events sent to one subscriber and not yet acked, at most.
const WINDOW: usize = 512;

/// Events in one answer to a query, at most.
pub(crate) const MAX_PAGE: usize = 1000;
/// Bytes of event bodies in one answer to a query, at most (a page holds one event at least).
/// The whole page is queued on the client's connection at once, so it must fit its queue.
pub(crate) const MAX_PAGE_BYTES: u64 = 2 * 1024 * 1024;
const _: () = assert!(2 * MAX_PAGE_BYTES as usize <= crate::ipc::CLI_QUEUE_BYTES);

pub(crate) struct Limits {
    /// Rotate events.log past this size (the previous file is kept as events.log.1): the bytes of
    /// events retained are at most about twice this.
    pub max_log_bytes: u64,
    /// Events retained for replay (32 bytes of index each in memory).
    pub max_retained: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_log_bytes: 64 * 1024 * 1024,
            max_retained: 100_000,
        }
    }
}

/// One subscriber's line in subscribers.json.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SubscriberState {
    pub types: BTreeSet<String>,
    pub acked: u64,
}

struct Subscriber {
    state: SubscriberState,
    /// `state.types` as catalog bits.
    mask: u64,
    conn: Option<ConnTx>,
    /// Sequence numbers sent and not yet acked, oldest first.
    in_flight: VecDeque<u64>,
    /// Highest sequence number considered for sending.
    cursor: u64,
}

impl Subscriber {
    fn new(state: SubscriberState) -> Subscriber {
        let cursor = state.acked;
        Subscriber {
            mask: store::mask(&state.types),
            state,
            conn: None,
            in_flight: VecDeque::new(),
            cursor,
        }
    }
}

/// A CLI following the stream (`events -f`).
struct Watcher {
    mask: u64,
    tx: ConnTx,
}

/// One answer to a query: matching events oldest first, and where the next page starts.
pub(crate) struct Page {
    pub events: Vec<Arc<Event>>,
    /// Set when more matching events remain: ask again with `since` = this.
    pub next_since: Option<u64>,
}

/// Why an event was not accepted; nothing was logged or delivered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// An unknown type or a payload the catalog refuses (the message says what and why).
    #[error(transparent)]
    Invalid(#[from] events::InvalidEvent),
    /// The event could not be written to events.log.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// The event's fencing token is older than one this node has seen for the same lease: it
    /// comes from a leader that has been replaced.
    #[error("stale fencing token {token} for the lease {lease} (this node has seen {seen})")]
    Fenced {
        /// The lease.
        lease: String,
        /// The event's token.
        token: u64,
        /// The highest token seen for the lease.
        seen: u64,
    },
}

/// A subscription naming an event type the catalog does not know (`type` as the worker wrote it).
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to unknown event type '{event_type}'")]
pub(crate) struct UnknownEventType {
    pub event_type: String,
}

pub(crate) struct Router {
    dir: PathBuf,
    store: Store,
    next_seq: u64,
    id_prefix: String,
    subscribers: BTreeMap<String, Subscriber>,
    watchers: Vec<Watcher>,
    routed: u64,
    /// subscribers.json was lost: subscribers not known yet start from the oldest retained event.
    replay_from_oldest: bool,
    quarantined: Vec<String>,
    /// subscribers.json or state.json is behind.
    pub(crate) dirty: bool,
    /// Ids of the latest events taken from other nodes, oldest first: one delivered again (its
    /// ack was lost) is dropped, not logged twice.
    remote_seen: (HashSet<String>, VecDeque<String>),
    /// The highest fencing token seen on an event, by lease (at most `FENCES` leases).
    fences: BTreeMap<String, u64>,
}

/// Leases whose highest token is remembered: a cluster has a few per daemon and config key, so
/// this bounds only what a hostile peer could make this node keep.
const FENCES: usize = 4096;

/// Remote event ids remembered for deduplication; JetStream redelivers only unacked messages, so
/// a duplicate can only be recent.
const REMOTE_SEEN: usize = 65_536;

impl Router {
    /// Opens (creating) data/events, moves damaged parts aside and indexes the retained log.
    /// Returns the router and one warning per thing that was damaged, for the supervisor's log.
    pub(crate) fn open(dir: &Path, limits: Limits) -> Result<(Router, Vec<String>), OpenError> {
        let rec = recovery::recover(dir)?;
        let store = Store::new(
            dir,
            rec.cur,
            rec.prev,
            rec.entries,
            limits.max_log_bytes,
            limits.max_retained,
        )
        .map_err(|source| OpenError::Read {
            path: dir.join("events.log"),
            source,
        })?;
        let (secs, millis) = ringrift::timefmt::unix_now();
        let router = Router {
            dir: dir.to_path_buf(),
            store,
            next_seq: rec.last_seq + 1,
            id_prefix: format!("{:x}{:03x}{:x}", secs, millis, std::process::id()),
            subscribers: rec
                .subscribers
                .into_iter()
                .map(|(name, state)| (name, Subscriber::new(state)))
                .collect(),
            watchers: Vec::new(),
            routed: 0,
            replay_from_oldest: rec.replay_from_oldest,
            quarantined: rec
                .quarantined
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            // The high-water mark and a reset of positions are written soon.
            dirty: !rec.warnings.is_empty(),
            remote_seen: Default::default(),
            fences: BTreeMap::new(),
        };
        Ok((router, rec.warnings))
    }

    /// Validates, appends to the log, then delivers. The error says why the event was refused.
    pub(crate) fn publish(
        &mut self,
        event_type: &str,
        payload: Value,
        source: &str,
    ) -> Result<Arc<Event>, PublishError> {
        self.publish_fenced(event_type, payload, source, None)
    }

    /// As [`Router::publish`], for a daemon acting under a lease: `fence` is stamped on the event,
    /// and refused if this node has seen a higher token for the lease.
    pub(crate) fn publish_fenced(
        &mut self,
        event_type: &str,
        payload: Value,
        source: &str,
        fence: Option<events::Fence>,
    ) -> Result<Arc<Event>, PublishError> {
        let event_type = events::validate(event_type, &payload)?;
        if let Some(f) = &fence {
            self.check_fence(f)?;
        }
        let seq = self.next_seq;
        self.append(Event {
            seq,
            id: format!("{}-{seq}", self.id_prefix),
            event_type,
            payload,
            source: source.to_string(),
            timestamp: ringrift::timefmt::now_rfc3339(),
            node: None,
            fence,
        })
    }

    /// Refuses a token below the highest seen for its lease; otherwise remembers it.
    fn check_fence(&mut self, f: &events::Fence) -> Result<(), PublishError> {
        match self.fences.get_mut(&f.lease) {
            Some(seen) if f.token < *seen => Err(PublishError::Fenced {
                lease: f.lease.clone(),
                token: f.token,
                seen: *seen,
            }),
            Some(seen) => {
                *seen = f.token;
                Ok(())
            }
            None => {
                if self.fences.len() < FENCES {
                    self.fences.insert(f.lease.clone(), f.token);
                }
                Ok(())
            }
        }
    }

    /// Takes an event first published on `node` of the cluster: validated like a local one, kept
    /// with its id, source and time, numbered in this node's log. None when it was taken already.
    pub(crate) fn publish_remote(
        &mut self,
        node: &str,
        remote: Event,
    ) -> Result<Option<Arc<Event>>, PublishError> {
        let event_type = events::validate(&remote.event_type, &remote.payload)?;
        if self.remote_seen.0.contains(&remote.id) {
            return Ok(None);
        }
        if let Some(f) = &remote.fence {
            self.check_fence(f)?;
        }
        let (seen, order) = &mut self.remote_seen;
        seen.insert(remote.id.clone());
        order.push_back(remote.id.clone());
        if order.len() > REMOTE_SEEN
            && let Some(old) = order.pop_front()
        {
            seen.remove(&old);
        }
        let seq = self.next_seq;
        self.append(Event {
            seq,
            event_type,
            node: Some(node.to_string()),
            ..remote
        })
        .map(Some)
    }

    /// Appends to the log, then delivers to subscribers and watchers.
    fn append(&mut self, ev: Event) -> Result<Arc<Event>, PublishError> {
        let ev = Arc::new(ev);
        self.store.append(&ev)?;
        self.next_seq += 1;
        self.routed += 1;
        // The high-water mark in state.json follows, a few times a second at most.
        self.dirty = true;
        let names: Vec<String> = self.subscribers.keys().cloned().collect();
        for name in names {
            self.pump(&name);
        }
        let bit = store::mask([&ev.event_type]);
        self.watchers.retain(|w| {
            w.mask & bit == 0
                || w.tx
                    .send(FromSupervisor::Event {
                        event: (*ev).clone(),
                    })
                    .is_ok()
        });
        Ok(ev)
    }

    /// A worker (re)subscribes: its unacked events are sent again from the start.
    pub(crate) fn subscribe(
        &mut self,
        name: &str,
        types: &[String],
        tx: ConnTx,
    ) -> Result<(), UnknownEventType> {
        let mut set = BTreeSet::new();
        for t in types {
            let n = events::normalize(t);
            if events::find(&n).is_none() {
                return Err(UnknownEventType {
                    event_type: t.clone(),
                });
            }
            set.insert(n);
        }
        // A first subscription starts at the present: it does not receive history. After the
        // positions were lost, it starts from the oldest retained event instead.
        let start = if self.replay_from_oldest {
            0
        } else {
            self.next_seq - 1
        };
        let sub = self.subscribers.entry(name.to_string()).or_insert_with(|| {
            Subscriber::new(SubscriberState {
                types: BTreeSet::new(),
                acked: start,
            })
        });
        if sub.state.types != set {
            sub.mask = store::mask(&set);
            sub.state.types = set;
            self.dirty = true;
        }
        sub.conn = Some(tx);
        sub.in_flight.clear();
        sub.cursor = sub.state.acked;
        self.pump(name);
        Ok(())
    }

    pub(crate) fn ack(&mut self, name: &str, seq: u64) {
        let Some(sub) = self.subscribers.get_mut(name) else {
            return;
        };
        if seq > sub.state.acked {
            sub.state.acked = seq.min(self.next_seq - 1);
            self.dirty = true;
        }
        while sub.in_flight.front().is_some_and(|s| *s <= seq) {
            sub.in_flight.pop_front();
        }
        self.pump(name);
    }

    /// The daemon's connection is gone: what was in flight will be sent again on its next subscribe.
    pub(crate) fn disconnect(&mut self, name: &str) {
        if let Some(sub) = self.subscribers.get_mut(name) {
            sub.conn = None;
            sub.in_flight.clear();
            sub.cursor = sub.state.acked;
        }
    }

    /// Sends what the subscriber's window allows, reading bodies from the log.
    fn pump(&mut self, name: &str) {
        let Some(sub) = self.subscribers.get_mut(name) else {
            return;
        };
        let Some(tx) = sub.conn.clone() else { return };
        let index = self.store.index();
        // Events older than the retained ones are gone for good: this skips past them.
        let mut pos = self.store.position_after(sub.cursor);
        while sub.in_flight.len() < WINDOW {
            let Some(e) = index.get(pos) else { break };
            pos += 1;
            sub.cursor = e.seq;
            if !e.matches(sub.mask) {
                continue;
            }
            // An event its file no longer holds is skipped like one that is gone.
            let Some(ev) = self.store.read(e) else {
                continue;
            };
            if tx
                .send(FromSupervisor::Event {
                    event: (*ev).clone(),
                })
                .is_err()
            {
                sub.conn = None;
                break;
            }
            sub.in_flight.push_back(e.seq);
        }
    }

    /// One page of the matching events after `since`, oldest first: from the start, or (with
    /// `limit`) from where only the newest `limit` remain. A page ends after [`MAX_PAGE`] events
    /// or [`MAX_PAGE_BYTES`]; `next_since` then says where the next one starts.
    pub(crate) fn query(&self, since: u64, types: &BTreeSet<String>, limit: Option<usize>) -> Page {
        let mask = if types.is_empty() {
            ALL_TYPES
        } else {
            store::mask(types)
        };
        let index = self.store.index();
        let from = self.store.position_after(since);
        let mut start = index.len();
        match limit {
            None => start = from,
            Some(n) => {
                let mut found = 0;
                while start > from && found < n {
                    start -= 1;
                    if index[start].matches(mask) {
                        found += 1;
                    }
                }
            }
        }
        let mut events = Vec::new();
        let mut bytes = 0;
        let mut last_seen = since;
        for e in index.range(start..) {
            if e.matches(mask) {
                let full = events.len() >= MAX_PAGE
                    || (bytes + u64::from(e.len) > MAX_PAGE_BYTES && !events.is_empty());
                if full {
                    return Page {
                        events,
                        next_since: Some(last_seen),
                    };
                }
                if let Some(ev) = self.store.read(e) {
                    bytes += u64::from(e.len);
                    events.push(ev);
                }
            }
            last_seen = e.seq;
        }
        Page {
            events,
            next_since: None,
        }
    }

    pub(crate) fn watch(&mut self, types: &BTreeSet<String>, tx: ConnTx) {
        let mask = if types.is_empty() {
            ALL_TYPES
        } else {
            store::mask(types)
        };
        self.watchers.push(Watcher { mask, tx });
    }

    /// Matching events the subscriber has not acked.
    pub(crate) fn backlog(&self, name: &str) -> (Vec<String>, u64) {
        let Some(sub) = self.subscribers.get(name) else {
            return (Vec::new(), 0);
        };
        let n = self
            .store
            .index()
            .range(self.store.position_after(sub.state.acked)..)
            .filter(|e| e.matches(sub.mask))
            .count();
        (sub.state.types.iter().cloned().collect(), n as u64)
    }

    pub(crate) fn info(&self) -> EventsInfo {
        EventsInfo {
            last_seq: self.next_seq - 1,
            routed: self.routed,
            retained: self.store.index().len() as u64,
            log_path: self.store.log_path().display().to_string(),
            quarantined: self.quarantined.clone(),
        }
    }

    /// Writes every subscriber's position and the high-water mark (each atomically).
    pub(crate) fn save(&mut self) -> io::Result<()> {
        let subs: BTreeMap<&String, &SubscriberState> = self
            .subscribers
            .iter()
            .map(|(n, s)| (n, &s.state))
            .collect();
        self.write_atomically("subscribers.json", &subs)?;
        let state = recovery::State {
            last_seq: self.next_seq - 1,
            replay_from_oldest: self.replay_from_oldest,
        };
        self.write_atomically("state.json", &state)?;
        self.dirty = false;
        Ok(())
    }

    fn write_atomically(&self, name: &str, value: &impl Serialize) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(value).expect("serializes"))?;
        std::fs::rename(tmp, self.dir.join(name))
    }
}

#[cfg(test)]
mod tests;
