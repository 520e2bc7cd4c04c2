//! The event router: durable, at-least-once delivery of typed events between daemon processes.
//!
//! Every accepted event is appended to `data/events/events.log` (one JSON line, with its sequence
//! number and id) *before* it is delivered. Subscribers are known by daemon name, not by
//! connection: each one's subscribed types and last acked sequence number are kept in
//! `data/events/subscribers.json`, so a daemon that restarts is sent everything it has not acked,
//! including what was emitted while it was down. Each subscriber has a bounded window of events in
//! flight; a slow one only grows its own backlog (shown in `status`), it never delays the others.
//! The log rotates by size and the in-memory copy keeps a bounded number of events.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringrift::events::{self, Event};
use ringrift::protocol::{EventsInfo, FromSupervisor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::ConnTx;

/// Events sent to one subscriber and not yet acked, at most.
const WINDOW: usize = 512;

pub(crate) struct Limits {
    /// Rotate events.log past this size (the previous file is kept as events.log.1).
    pub max_log_bytes: u64,
    /// Events kept in memory for replay.
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct SubscriberState {
    types: BTreeSet<String>,
    acked: u64,
}

struct Subscriber {
    state: SubscriberState,
    conn: Option<ConnTx>,
    /// Sequence numbers sent and not yet acked, oldest first.
    in_flight: VecDeque<u64>,
    /// Highest sequence number considered for sending.
    cursor: u64,
}

/// A CLI following the stream (`events -f`).
struct Watcher {
    types: BTreeSet<String>,
    tx: ConnTx,
}

pub(crate) struct Router {
    dir: PathBuf,
    log: File,
    log_bytes: u64,
    limits: Limits,
    retained: VecDeque<Arc<Event>>,
    next_seq: u64,
    id_prefix: String,
    subscribers: BTreeMap<String, Subscriber>,
    watchers: Vec<Watcher>,
    routed: u64,
    /// subscribers.json is behind.
    pub(crate) dirty: bool,
}

impl Router {
    /// Opens (creating) data/events and loads the retained log and the subscribers' positions.
    pub(crate) fn open(dir: &Path, limits: Limits) -> io::Result<Router> {
        std::fs::create_dir_all(dir)?;
        let mut retained = VecDeque::new();
        let mut last = 0;
        for name in ["events.log.1", "events.log"] {
            let Ok(f) = File::open(dir.join(name)) else {
                continue;
            };
            for line in BufReader::new(f).lines() {
                let line = line?;
                // A torn last line (crash mid-write) is skipped, not fatal.
                let Ok(ev) = serde_json::from_str::<Event>(&line) else {
                    continue;
                };
                if ev.seq <= last {
                    continue;
                }
                last = ev.seq;
                retained.push_back(Arc::new(ev));
                if retained.len() > limits.max_retained {
                    retained.pop_front();
                }
            }
        }
        let subs: BTreeMap<String, SubscriberState> = std::fs::read(dir.join("subscribers.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // A subscriber file ahead of the log (the log was deleted) must not hide new events.
        last = last.max(subs.values().map(|s| s.acked).max().unwrap_or(0));
        let log_path = dir.join("events.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let log_bytes = log.metadata()?.len();
        let (secs, millis) = ringrift::timefmt::unix_now();
        Ok(Router {
            dir: dir.to_path_buf(),
            log,
            log_bytes,
            limits,
            retained,
            next_seq: last + 1,
            id_prefix: format!("{:x}{:03x}{:x}", secs, millis, std::process::id()),
            subscribers: subs
                .into_iter()
                .map(|(name, state)| {
                    let cursor = state.acked;
                    (
                        name,
                        Subscriber {
                            state,
                            conn: None,
                            in_flight: VecDeque::new(),
                            cursor,
                        },
                    )
                })
                .collect(),
            watchers: Vec::new(),
            routed: 0,
            dirty: false,
        })
    }

    /// Validates, appends to the log, then delivers. The error is the validation message.
    pub(crate) fn publish(
        &mut self,
        event_type: &str,
        payload: Value,
        source: &str,
    ) -> Result<Arc<Event>, String> {
        let event_type = events::validate(event_type, &payload).map_err(|e| e.0)?;
        let seq = self.next_seq;
        let ev = Arc::new(Event {
            seq,
            id: format!("{}-{seq}", self.id_prefix),
            event_type,
            payload,
            source: source.to_string(),
            timestamp: ringrift::timefmt::now_rfc3339(),
        });
        let mut line = serde_json::to_vec(&*ev).expect("events serialize");
        line.push(b'\n');
        self.log
            .write_all(&line)
            .map_err(|e| format!("cannot append to the event log: {e}"))?;
        self.next_seq += 1;
        self.log_bytes += line.len() as u64;
        if self.log_bytes > self.limits.max_log_bytes {
            self.rotate();
        }
        self.retained.push_back(ev.clone());
        if self.retained.len() > self.limits.max_retained {
            self.retained.pop_front();
        }
        self.routed += 1;
        let names: Vec<String> = self.subscribers.keys().cloned().collect();
        for name in names {
            self.pump(&name);
        }
        self.watchers.retain(|w| {
            !(w.types.is_empty() || w.types.contains(&ev.event_type))
                || w.tx
                    .send(FromSupervisor::Event {
                        event: (*ev).clone(),
                    })
                    .is_ok()
        });
        Ok(ev)
    }

    fn rotate(&mut self) {
        let (cur, old) = (self.dir.join("events.log"), self.dir.join("events.log.1"));
        if std::fs::rename(&cur, &old).is_ok()
            && let Ok(f) = OpenOptions::new().create(true).append(true).open(&cur)
        {
            self.log = f;
            self.log_bytes = 0;
        }
    }

    /// A worker (re)subscribes: its unacked events are sent again from the start.
    pub(crate) fn subscribe(
        &mut self,
        name: &str,
        types: &[String],
        tx: ConnTx,
    ) -> Result<(), String> {
        let mut set = BTreeSet::new();
        for t in types {
            let n = events::normalize(t);
            if events::find(&n).is_none() {
                return Err(format!("cannot subscribe to unknown event type '{t}'"));
            }
            set.insert(n);
        }
        let sub = self
            .subscribers
            .entry(name.to_string())
            .or_insert_with(|| Subscriber {
                // A first subscription starts at the present: it does not receive history.
                state: SubscriberState {
                    types: BTreeSet::new(),
                    acked: self.next_seq - 1,
                },
                conn: None,
                in_flight: VecDeque::new(),
                cursor: self.next_seq - 1,
            });
        if sub.state.types != set {
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

    /// Sends what the subscriber's window allows.
    fn pump(&mut self, name: &str) {
        let Some(sub) = self.subscribers.get_mut(name) else {
            return;
        };
        let Some(tx) = sub.conn.clone() else { return };
        let Some(first) = self.retained.front().map(|e| e.seq) else {
            return;
        };
        while sub.in_flight.len() < WINDOW {
            let next = sub.cursor + 1;
            if next >= self.next_seq {
                break;
            }
            // Events older than the retained window are gone for good: skip ahead.
            let idx = next.saturating_sub(first) as usize;
            let Some(ev) = self.retained.get(idx) else {
                break;
            };
            sub.cursor = ev.seq;
            if sub.state.types.contains(&ev.event_type) {
                if tx
                    .send(FromSupervisor::Event {
                        event: (**ev).clone(),
                    })
                    .is_err()
                {
                    sub.conn = None;
                    break;
                }
                sub.in_flight.push_back(ev.seq);
            }
        }
    }

    /// Matching events after `since` (the newest `limit` of them).
    pub(crate) fn query(
        &self,
        since: u64,
        types: &BTreeSet<String>,
        limit: Option<usize>,
    ) -> Vec<Arc<Event>> {
        let mut out: Vec<Arc<Event>> = self
            .retained
            .iter()
            .filter(|e| e.seq > since && (types.is_empty() || types.contains(&e.event_type)))
            .cloned()
            .collect();
        if let Some(n) = limit
            && out.len() > n
        {
            out.drain(..out.len() - n);
        }
        out
    }

    pub(crate) fn watch(&mut self, types: BTreeSet<String>, tx: ConnTx) {
        self.watchers.push(Watcher { types, tx });
    }

    /// Matching events the subscriber has not acked.
    pub(crate) fn backlog(&self, name: &str) -> (Vec<String>, u64) {
        let Some(sub) = self.subscribers.get(name) else {
            return (Vec::new(), 0);
        };
        let first = self
            .retained
            .front()
            .map(|e| e.seq)
            .unwrap_or(self.next_seq);
        let start = (sub.state.acked + 1).saturating_sub(first) as usize;
        let n = self
            .retained
            .iter()
            .skip(start)
            .filter(|e| sub.state.types.contains(&e.event_type))
            .count();
        (sub.state.types.iter().cloned().collect(), n as u64)
    }

    pub(crate) fn info(&self) -> EventsInfo {
        EventsInfo {
            last_seq: self.next_seq - 1,
            routed: self.routed,
            retained: self.retained.len() as u64,
            log_path: self.dir.join("events.log").display().to_string(),
        }
    }

    /// Writes every subscriber's position (atomically).
    pub(crate) fn save(&mut self) -> io::Result<()> {
        let state: BTreeMap<&String, &SubscriberState> = self
            .subscribers
            .iter()
            .map(|(n, s)| (n, &s.state))
            .collect();
        let tmp = self.dir.join("subscribers.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state).expect("serializes"))?;
        std::fs::rename(tmp, self.dir.join("subscribers.json"))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn games(n: i64) -> Value {
        json!({"config_key": "hex8_2p", "new_games": n})
    }

    fn drain(rx: &mut crate::ipc::ConnRx) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(FromSupervisor::Event { event }) = rx.try_frame() {
            out.push(event.seq);
        }
        out
    }

    #[test]
    fn events_reach_subscribers_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Router::open(dir.path(), Limits::default()).unwrap();
        let (tx, mut rx) = crate::ipc::ConnTx::new(1 << 30);
        r.subscribe("a", &["new_games_available".into()], tx)
            .unwrap();
        for i in 0..3 {
            r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
        }
        r.publish("TRAINING_STARTED", json!({"config_key": "hex8_2p"}), "test")
            .unwrap();
        assert_eq!(drain(&mut rx), vec![1, 2, 3], "only subscribed types");
        r.ack("a", 2);
        r.disconnect("a");
        r.publish("NEW_GAMES_AVAILABLE", games(9), "test").unwrap();
        r.save().unwrap();
        drop(r);

        // A new supervisor: the unacked event 3 and the one emitted while down (5) are delivered.
        let mut r = Router::open(dir.path(), Limits::default()).unwrap();
        let (tx, mut rx) = crate::ipc::ConnTx::new(1 << 30);
        r.subscribe("a", &["NEW_GAMES_AVAILABLE".into()], tx)
            .unwrap();
        assert_eq!(drain(&mut rx), vec![3, 5]);
        assert_eq!(
            r.publish("NEW_GAMES_AVAILABLE", games(1), "test")
                .unwrap()
                .seq,
            6,
            "sequence numbers continue"
        );
    }

    #[test]
    fn invalid_events_are_refused_and_not_logged() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Router::open(dir.path(), Limits::default()).unwrap();
        let e = r
            .publish("TRAINING_STARTED", json!({"config": "hex8_2p"}), "test")
            .unwrap_err();
        assert!(e.contains("'config'"), "{e}");
        assert_eq!(r.info().last_seq, 0);
    }

    #[test]
    fn a_slow_subscriber_is_bounded_by_its_window_and_does_not_hold_up_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Router::open(dir.path(), Limits::default()).unwrap();
        let (slow_tx, mut slow_rx) = crate::ipc::ConnTx::new(1 << 30);
        let (fast_tx, mut fast_rx) = crate::ipc::ConnTx::new(1 << 30);
        r.subscribe("slow", &["NEW_GAMES_AVAILABLE".into()], slow_tx)
            .unwrap();
        r.subscribe("fast", &["NEW_GAMES_AVAILABLE".into()], fast_tx)
            .unwrap();
        for i in 0..(WINDOW as i64 + 100) {
            r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
            let got = drain(&mut fast_rx);
            r.ack("fast", *got.last().unwrap());
        }
        assert_eq!(
            drain(&mut slow_rx).len(),
            WINDOW,
            "the slow one gets only its window"
        );
        assert_eq!(r.backlog("slow").1, WINDOW as u64 + 100);
        assert_eq!(r.backlog("fast").1, 0);
        r.ack("slow", WINDOW as u64);
        assert_eq!(drain(&mut slow_rx).len(), 100, "acks open the window");
    }

    #[test]
    fn the_log_rotates_and_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Router::open(
            dir.path(),
            Limits {
                max_log_bytes: 2000,
                max_retained: 10,
            },
        )
        .unwrap();
        for i in 0..50 {
            r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
        }
        assert!(dir.path().join("events.log.1").exists());
        assert!(
            std::fs::metadata(dir.path().join("events.log"))
                .unwrap()
                .len()
                <= 2200
        );
        assert_eq!(r.info().retained, 10);
        let r = Router::open(
            dir.path(),
            Limits {
                max_log_bytes: 2000,
                max_retained: 10,
            },
        )
        .unwrap();
        assert_eq!(r.info().last_seq, 50);
    }

    #[test]
    fn queries_filter_by_type_and_since() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Router::open(dir.path(), Limits::default()).unwrap();
        for i in 0..5 {
            r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
            r.publish("TRAINING_STARTED", json!({"config_key": "hex8_2p"}), "test")
                .unwrap();
        }
        let types: BTreeSet<String> = ["TRAINING_STARTED".to_string()].into();
        let q = r.query(4, &types, None);
        assert_eq!(q.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 8, 10]);
        assert_eq!(r.query(0, &BTreeSet::new(), Some(2)).len(), 2);
    }
}
