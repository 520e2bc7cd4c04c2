//! The event log on disk and the compact index that finds each retained event in it.
//!
//! Only a 32-byte [`Entry`] per retained event stays in memory: its sequence number, its type as
//! an index into the catalog, which file holds it (a generation number) and where. Bodies are read
//! back with `pread` when a subscriber, a query or a follower needs them, so memory does not grow
//! with payload sizes, and under churn it stays flat once the index has reached its bound.
//!
//! Files: `events.log` (the current generation, append-only) and `events.log.1` (the one before).
//! Rotation renames the first onto the second; the open handle of the renamed file is kept for
//! reading, so its events stay readable until the next rotation drops them, and anything older is
//! gone (subscribers skip it). The bytes reachable are thus at most two files' worth.
//!
//! Fan-out reads the same new event once per subscriber: a small cache of the most recently
//! appended events (bounded in count and bytes) answers those without touching the file.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringrift::events::{EVENTS, Event};

/// The type of an event that is not in the catalog (written by another version).
pub(crate) const NO_TYPE: u8 = u8::MAX;

// Subscriptions are matched with a bit per catalog type.
const _: () = assert!(EVENTS.len() < 64);

/// Recently appended events kept whole for the fan-out, at most.
const RECENT_EVENTS: usize = 256;
const RECENT_BYTES: usize = 1024 * 1024;

/// Where one retained event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: u64,
    /// Byte offset of its line in its file.
    pub offset: u64,
    /// Length of its line, without the newline.
    pub len: u32,
    /// Which file: the store's current generation is events.log, the one before events.log.1.
    pub generation: u32,
    /// Index into the catalog, or [`NO_TYPE`].
    pub ty: u8,
}

impl Entry {
    pub(crate) fn matches(&self, mask: u64) -> bool {
        type_bit(self.ty) & mask != 0
    }
}

pub(crate) fn type_id(name: &str) -> u8 {
    EVENTS
        .iter()
        .position(|e| e.name == name)
        .map_or(NO_TYPE, |i| i as u8)
}

fn type_bit(ty: u8) -> u64 {
    if ty == NO_TYPE { 0 } else { 1 << ty }
}

/// The bit set of these (canonical) type names; names outside the catalog match nothing.
pub(crate) fn mask<'a>(names: impl IntoIterator<Item = &'a String>) -> u64 {
    names.into_iter().fold(0, |m, n| m | type_bit(type_id(n)))
}

/// Every type, for queries without a type filter (events outside the catalog included).
pub(crate) const ALL_TYPES: u64 = u64::MAX;

/// An event line that could not be written to events.log: the event is not accepted.
#[derive(Debug, thiserror::Error)]
#[error("cannot append to the event log: {0}")]
pub(crate) struct AppendError(#[source] pub io::Error);

pub(crate) struct Store {
    dir: PathBuf,
    /// events.log, opened for reading and appending.
    cur: File,
    /// events.log.1 (or the file it was when it was renamed), for reading.
    prev: Option<File>,
    /// Generation of `cur`; `prev` is the one before.
    generation: u32,
    log_bytes: u64,
    max_log_bytes: u64,
    max_retained: usize,
    index: VecDeque<Entry>,
    /// The last events appended, whole, with their line lengths.
    recent: VecDeque<(Arc<Event>, usize)>,
    recent_bytes: usize,
}

impl Store {
    /// A store over files recovery has checked: `entries` of generation 1 are in `prev`, of
    /// generation 2 in `cur`, oldest first.
    pub(crate) fn new(
        dir: &Path,
        cur: File,
        prev: Option<File>,
        entries: Vec<Entry>,
        max_log_bytes: u64,
        max_retained: usize,
    ) -> io::Result<Store> {
        let log_bytes = cur.metadata()?.len();
        let mut store = Store {
            dir: dir.to_path_buf(),
            cur,
            prev,
            generation: 2,
            log_bytes,
            max_log_bytes,
            max_retained,
            index: entries.into(),
            recent: VecDeque::new(),
            recent_bytes: 0,
        };
        store.trim();
        if store.log_bytes > store.max_log_bytes {
            store.rotate();
        }
        Ok(store)
    }

    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.join("events.log")
    }

    /// Appends one event line. On error nothing is indexed and the file is left ending in a
    /// newline where it can be (a torn line is moved aside at the next start).
    pub(crate) fn append(&mut self, ev: &Arc<Event>) -> Result<(), AppendError> {
        let mut line = serde_json::to_vec(&**ev).expect("events serialize");
        let len = line.len();
        line.push(b'\n');
        if let Err(e) = self.cur.write_all(&line) {
            if let Ok(m) = self.cur.metadata()
                && m.len() > self.log_bytes
            {
                let _ = self.cur.write_all(b"\n");
            }
            self.log_bytes = self.cur.metadata().map_or(self.log_bytes, |m| m.len());
            return Err(AppendError(e));
        }
        // The real end of the file, in case anything else appended to it: offsets must be exact.
        let end = self
            .cur
            .metadata()
            .map_or(self.log_bytes + line.len() as u64, |m| m.len());
        self.log_bytes = end;
        self.index.push_back(Entry {
            seq: ev.seq,
            offset: end - line.len() as u64,
            len: len as u32,
            generation: self.generation,
            ty: type_id(&ev.event_type),
        });
        self.remember(ev.clone(), len);
        self.trim();
        if self.log_bytes > self.max_log_bytes {
            self.rotate();
        }
        Ok(())
    }

    fn remember(&mut self, ev: Arc<Event>, len: usize) {
        // The cache holds consecutive sequence numbers only, so a lookup is an index.
        if self.recent.back().is_some_and(|(b, _)| b.seq + 1 != ev.seq) {
            self.recent.clear();
            self.recent_bytes = 0;
        }
        self.recent.push_back((ev, len));
        self.recent_bytes += len;
        while self.recent.len() > RECENT_EVENTS
            || (self.recent_bytes > RECENT_BYTES && self.recent.len() > 1)
        {
            if let Some((_, old)) = self.recent.pop_front() {
                self.recent_bytes -= old;
            }
        }
    }

    /// Drops index entries beyond the count bound and those whose file is gone.
    fn trim(&mut self) {
        let oldest_generation = self.generation - 1;
        while self.index.len() > self.max_retained
            || self
                .index
                .front()
                .is_some_and(|e| e.generation < oldest_generation)
        {
            self.index.pop_front();
        }
    }

    fn rotate(&mut self) {
        let (cur, old) = (self.dir.join("events.log"), self.dir.join("events.log.1"));
        if std::fs::rename(&cur, &old).is_err() {
            return;
        }
        // If the new file cannot be created, appending goes on in the renamed one, which the next
        // start reads as events.log.1.
        if let Ok(f) = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&cur)
        {
            self.prev = Some(std::mem::replace(&mut self.cur, f));
            self.generation += 1;
            self.log_bytes = 0;
            self.trim();
        }
    }

    pub(crate) fn index(&self) -> &VecDeque<Entry> {
        &self.index
    }

    /// Position of the first retained event after `seq`.
    pub(crate) fn position_after(&self, seq: u64) -> usize {
        self.index.partition_point(|e| e.seq <= seq)
    }

    #[cfg(test)]
    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// Bytes of event bodies the index refers to.
    #[cfg(test)]
    pub(crate) fn retained_bytes(&self) -> u64 {
        self.index.iter().map(|e| u64::from(e.len)).sum()
    }

    /// The event an entry points to; None if its file is gone or no longer holds it (someone
    /// changed the file under the supervisor).
    pub(crate) fn read(&self, e: &Entry) -> Option<Arc<Event>> {
        if let Some((first, _)) = self.recent.front()
            && e.seq >= first.seq
            && let Some((ev, _)) = self.recent.get((e.seq - first.seq) as usize)
            && ev.seq == e.seq
        {
            return Some(ev.clone());
        }
        let file = if e.generation == self.generation {
            &self.cur
        } else if e.generation + 1 == self.generation {
            self.prev.as_ref()?
        } else {
            return None;
        };
        let mut buf = vec![0; e.len as usize];
        file.read_exact_at(&mut buf, e.offset).ok()?;
        let ev: Event = serde_json::from_slice(&buf).ok()?;
        (ev.seq == e.seq).then(|| Arc::new(ev))
    }
}
