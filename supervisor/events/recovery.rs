//! Opening data/events: replaying the log into the index, and moving aside whatever cannot be read,
//! so that damaged files never stop the supervisor and never cost a good event.
//!
//! The log files are read line by line (a line is bounded; a longer one is damage, streamed aside
//! without being held). A line is a good event when it is UTF-8 JSON of an event whose sequence
//! number fits the ones around it: above the previous good one, not absurdly far above it, and not
//! a spike that the next line goes back below. Everything else — bad UTF-8, garbage, torn lines,
//! JSON that is not an event, sequence numbers that repeat, go backwards or jump — is copied,
//! byte for byte, to `<file>.damaged-<unix-secs>`, and the file is rewritten with the good lines
//! only (written to a temporary file, synced, renamed over: a crash in between leaves the original,
//! which the next start recovers again). If the rewrite itself fails, the good lines are indexed
//! where they are and the damage is skipped.
//!
//! A damaged `subscribers.json` (or `state.json`) is renamed to `<name>.damaged-<unix-secs>`. The
//! subscribers' positions are then unknown, so every subscriber the router does not know starts
//! from the oldest retained event instead of the present: redelivery (which consumers drop by id)
//! rather than loss. That choice is remembered in `state.json` until the file is removed.
//!
//! Sequence numbers are never reused: the next one is above every good event, every subscriber's
//! ack and the high-water mark kept in `state.json`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use super::SubscriberState;
use super::store::{Entry, type_id};

/// Sequence numbers above this are damage (2^53: what every JSON reader represents exactly).
pub(crate) const MAX_SEQ: u64 = 1 << 53;
/// A good line's sequence number is at most this far above the previous good one (a hundred
/// times the retention: gaps only come from lines moved aside).
pub(crate) const MAX_SEQ_JUMP: u64 = 10_000_000;
/// Longer lines are damage: events are at most 64 KiB of payload (older versions accepted frames
/// of up to 1 MiB).
const MAX_LINE_BYTES: usize = 2 * 1024 * 1024;

/// What `state.json` keeps across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    /// The highest sequence number ever handed out (at the last save).
    #[serde(default)]
    pub last_seq: u64,
    /// subscribers.json was lost: subscribers not known yet start from the oldest retained event.
    #[serde(default)]
    pub replay_from_oldest: bool,
}

pub(crate) struct Recovered {
    pub cur: File,
    pub prev: Option<File>,
    /// Good events: generation 1 in `prev`, 2 in `cur`, oldest first.
    pub entries: Vec<Entry>,
    pub last_seq: u64,
    pub subscribers: BTreeMap<String, SubscriberState>,
    pub replay_from_oldest: bool,
    /// One line each for the supervisor's log.
    pub warnings: Vec<String>,
    pub quarantined: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Damage {
    NotEvent,
    Torn,
    TooLong,
    Empty,
    OutOfOrder,
    Absurd,
}

impl Damage {
    fn describe(self) -> &'static str {
        match self {
            Damage::NotEvent => "not an event (bad UTF-8, garbage or other JSON)",
            Damage::Torn => "torn last line",
            Damage::TooLong => "longer than 2 MiB",
            Damage::Empty => "empty",
            Damage::OutOfOrder => "sequence number repeated or out of order",
            Damage::Absurd => "sequence number out of range",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Event { seq: u64, ty: u8 },
    Bad(Damage),
}

/// One line (or a run of damaged lines) of a log file.
#[derive(Debug, Clone, Copy)]
struct Line {
    start: u64,
    /// End of the text, newline excluded.
    end: u64,
    terminated: bool,
    kind: Kind,
    /// Lines in a run of damage.
    count: u32,
}

/// The shape of an event line; the payload is checked to be JSON, not parsed.
#[derive(Deserialize)]
struct Head {
    seq: u64,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(rename = "id")]
    _id: String,
    #[serde(rename = "payload")]
    _payload: IgnoredAny,
    #[serde(rename = "source")]
    _source: String,
    #[serde(rename = "timestamp")]
    _timestamp: String,
}

/// Why data/events cannot be opened. Damage never is (it is moved aside): only a file system that
/// refuses to create, read or write the files, or to move a damaged file aside.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("cannot create the event directory {dir}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// `problem` says what is wrong with the file's contents; `source` why it stays where it is.
    #[error("{path} is damaged ({problem}) and cannot be moved aside: {source}")]
    MoveAside {
        path: PathBuf,
        problem: String,
        source: io::Error,
    },
}

/// Reads the directory (creating it), moving damage aside.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let secs = ringrift::timefmt::unix_now().0;
    let mut warnings = Vec::new();
    let mut quarantined = Vec::new();

    let (state, _) = load_json::<State>(
        dir,
        "state.json",
        secs,
        |s| s.last_seq <= MAX_SEQ,
        &mut warnings,
        &mut quarantined,
    )?;
    let (subscribers, subs_damaged) = load_json::<BTreeMap<String, SubscriberState>>(
        dir,
        "subscribers.json",
        secs,
        |m| m.values().all(|s| s.acked <= MAX_SEQ),
        &mut warnings,
        &mut quarantined,
    )?;
    if subs_damaged {
        warnings.push(
            "event subscribers' positions are lost: each subscriber starts again from the oldest \
             retained event (consumers drop what they have seen by id)"
                .into(),
        );
    }
    let state = state.unwrap_or_default();
    let subscribers = subscribers.unwrap_or_default();

    // Scan both files, then judge sequence numbers across them (events.log.1 comes first).
    let names = ["events.log.1", "events.log"];
    let mut scans: Vec<Option<Vec<Line>>> = Vec::new();
    for name in names {
        let path = dir.join(name);
        match scan(&path) {
            Ok(lines) => scans.push(Some(lines)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => scans.push(None),
            Err(source) => return Err(OpenError::Read { path, source }),
        }
    }
    let last_good = judge(&mut scans);

    let mut entries = Vec::new();
    let mut prev = None;
    for (i, name) in names.iter().enumerate() {
        let Some(lines) = &scans[i] else { continue };
        let generation = i as u32 + 1;
        let path = dir.join(name);
        let damaged: BTreeMap<Damage, u32> = lines.iter().fold(BTreeMap::new(), |mut m, l| {
            if let Kind::Bad(d) = l.kind {
                *m.entry(d).or_default() += l.count;
            }
            m
        });
        let unterminated = lines.last().is_some_and(|l| !l.terminated);
        let in_place = || index_in_place(lines, generation);
        let file_entries = if damaged.is_empty() && !unterminated {
            in_place()
        } else {
            match rewrite(dir, name, lines, generation, secs) {
                Ok((q, es)) => {
                    if let Some(q) = q {
                        let what: Vec<String> = damaged
                            .iter()
                            .map(|(d, n)| format!("{n} {}", d.describe()))
                            .collect();
                        warnings.push(format!(
                            "{}: {} damaged line(s) ({}) moved to {}; {} good event(s) kept",
                            path.display(),
                            damaged.values().sum::<u32>(),
                            what.join(", "),
                            q.display(),
                            es.len()
                        ));
                        quarantined.push(q);
                    }
                    es
                }
                Err(e) => {
                    warnings.push(format!(
                        "{}: damaged lines found but cannot be moved aside ({e}); they are skipped",
                        path.display()
                    ));
                    in_place()
                }
            }
        };
        entries.extend(file_entries);
        if i == 0 {
            prev = Some(File::open(&path).map_err(|source| OpenError::Read { path, source })?);
        }
    }

    let log_path = dir.join("events.log");
    let mut cur = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| OpenError::Open {
            path: log_path.clone(),
            source,
        })?;
    // A last line left without its newline (when it could not be rewritten) must not swallow the
    // next event.
    let len = cur.metadata().map(|m| m.len()).unwrap_or(0);
    let mut last = [0u8];
    if len > 0 && cur.read_exact_at(&mut last, len - 1).is_ok() && last[0] != b'\n' {
        cur.write_all(b"\n").map_err(|source| OpenError::Write {
            path: log_path,
            source,
        })?;
    }

    let max_acked = subscribers.values().map(|s| s.acked).max().unwrap_or(0);
    Ok(Recovered {
        cur,
        prev,
        entries,
        last_seq: last_good.max(max_acked).max(state.last_seq),
        subscribers,
        replay_from_oldest: subs_damaged || state.replay_from_oldest,
        warnings,
        quarantined,
    })
}

/// Loads a JSON file; a damaged one is renamed aside (Ok((None, true))). Err only when it cannot be.
fn load_json<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
    secs: u64,
    valid: impl Fn(&T) -> bool,
    warnings: &mut Vec<String>,
    quarantined: &mut Vec<PathBuf>,
) -> Result<(Option<T>, bool), OpenError> {
    let path = dir.join(name);
    let problem = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<T>(&bytes) {
            Ok(v) if valid(&v) => return Ok((Some(v), false)),
            Ok(_) => "a value out of range".to_string(),
            Err(e) => e.to_string(),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((None, false)),
        Err(e) => e.to_string(),
    };
    let aside = free_name(dir, &format!("{name}.damaged-{secs}"));
    if let Err(source) = std::fs::rename(&path, &aside) {
        return Err(OpenError::MoveAside {
            path,
            problem,
            source,
        });
    }
    warnings.push(format!(
        "{} is damaged ({problem}); moved to {}",
        path.display(),
        aside.display()
    ));
    quarantined.push(aside);
    Ok((None, true))
}

/// `base`, or `base-2`, `base-3` ... whichever does not exist yet.
fn free_name(dir: &Path, base: &str) -> PathBuf {
    let mut path = dir.join(base);
    let mut n = 2;
    while path.symlink_metadata().is_ok() {
        path = dir.join(format!("{base}-{n}"));
        n += 1;
    }
    path
}

/// Splits a file into lines and classifies each (sequence order is judged later).
fn scan(path: &Path) -> io::Result<Vec<Line>> {
    let mut reader = BufReader::with_capacity(64 * 1024, File::open(path)?);
    let mut lines: Vec<Line> = Vec::new();
    let mut text = Vec::new();
    let (mut start, mut pos, mut too_long) = (0u64, 0u64, false);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if pos > start {
                push_line(
                    &mut lines,
                    classify(&text, too_long, false),
                    start,
                    pos,
                    false,
                );
            }
            return Ok(lines);
        }
        let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        if too_long || text.len() + chunk.len() > MAX_LINE_BYTES {
            too_long = true;
            text = Vec::new();
        } else {
            text.extend_from_slice(chunk);
        }
        let taken = chunk.len();
        reader.consume(taken + usize::from(newline));
        pos += taken as u64;
        if newline {
            push_line(
                &mut lines,
                classify(&text, too_long, true),
                start,
                pos,
                true,
            );
            pos += 1;
            start = pos;
            text.clear();
            too_long = false;
        }
    }
}

fn classify(text: &[u8], too_long: bool, terminated: bool) -> Kind {
    let bad = |d| Kind::Bad(if terminated { d } else { Damage::Torn });
    if too_long {
        return bad(Damage::TooLong);
    }
    if text.is_empty() {
        return bad(Damage::Empty);
    }
    match serde_json::from_slice::<Head>(text) {
        Ok(h) => Kind::Event {
            seq: h.seq,
            ty: type_id(&h.event_type),
        },
        Err(_) => bad(Damage::NotEvent),
    }
}

/// Appends a line, merging a run of damaged lines into one (a garbage file may hold millions).
fn push_line(lines: &mut Vec<Line>, kind: Kind, start: u64, end: u64, terminated: bool) {
    if let Kind::Bad(d) = kind
        && let Some(last) = lines.last_mut()
        && matches!(last.kind, Kind::Bad(ld) if ld == d)
        && last.terminated
    {
        last.end = end;
        last.terminated = terminated;
        last.count += 1;
        return;
    }
    lines.push(Line {
        start,
        end,
        terminated,
        kind,
        count: 1,
    });
}

/// Marks events whose sequence numbers do not fit as damage; returns the last good one.
fn judge(scans: &mut [Option<Vec<Line>>]) -> u64 {
    let seq_of = |l: &Line| match l.kind {
        Kind::Event { seq, .. } => Some(seq),
        Kind::Bad(_) => None,
    };
    let mut refs: Vec<(usize, usize)> = Vec::new();
    for (f, lines) in scans.iter().enumerate() {
        for (i, l) in lines.iter().flatten().enumerate() {
            if seq_of(l).is_some() {
                refs.push((f, i));
            }
        }
    }
    let seqs: Vec<u64> = refs
        .iter()
        .map(|&(f, i)| seq_of(&scans[f].as_ref().expect("scanned")[i]).expect("an event"))
        .collect();
    let mut last = 0;
    for (k, &(f, i)) in refs.iter().enumerate() {
        let seq = seqs[k];
        let next = seqs.get(k + 1).copied();
        let damage = if seq == 0 || seq > MAX_SEQ {
            Some(Damage::Absurd)
        } else if seq <= last {
            Some(Damage::OutOfOrder)
        } else if last > 0 && seq - last > MAX_SEQ_JUMP {
            Some(Damage::Absurd)
        } else if next.is_some_and(|n| n > last && n < seq) {
            // A spike: the next line goes back below it.
            Some(Damage::OutOfOrder)
        } else {
            None
        };
        match damage {
            Some(d) => scans[f].as_mut().expect("scanned")[i].kind = Kind::Bad(d),
            None => last = seq,
        }
    }
    last
}

fn entry(l: &Line, generation: u32, offset: u64) -> Option<Entry> {
    match l.kind {
        Kind::Event { seq, ty } => Some(Entry {
            seq,
            offset,
            len: (l.end - l.start) as u32,
            generation,
            ty,
        }),
        Kind::Bad(_) => None,
    }
}

fn index_in_place(lines: &[Line], generation: u32) -> Vec<Entry> {
    lines
        .iter()
        .filter_map(|l| entry(l, generation, l.start))
        .collect()
}

/// Copies damage to the quarantine file (if any) and good lines to a new file renamed over the
/// old one. Returns the quarantine file and the entries at their new offsets.
fn rewrite(
    dir: &Path,
    name: &str,
    lines: &[Line],
    generation: u32,
    secs: u64,
) -> io::Result<(Option<PathBuf>, Vec<Entry>)> {
    let path = dir.join(name);
    let src = File::open(&path)?;
    let tmp = dir.join(format!("{name}.recovering"));
    let mut out = BufWriter::new(File::create(&tmp)?);
    let mut quarantine: Option<(PathBuf, BufWriter<File>)> = None;
    let mut entries = Vec::new();
    let mut offset = 0;
    for l in lines {
        if let Some(e) = entry(l, generation, offset) {
            copy(&src, l.start, l.end, &mut out)?;
            out.write_all(b"\n")?;
            entries.push(e);
            offset += u64::from(e.len) + 1;
            continue;
        }
        let q = match &mut quarantine {
            Some((_, q)) => q,
            None => {
                let (qpath, f) = create_free(dir, &format!("{name}.damaged-{secs}"))?;
                &mut quarantine.insert((qpath, BufWriter::new(f))).1
            }
        };
        copy(&src, l.start, l.end, q)?;
        q.write_all(b"\n")?;
    }
    let out = out.into_inner().map_err(|e| e.into_error())?;
    out.sync_all()?;
    let qpath = match quarantine {
        Some((qpath, q)) => {
            q.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Some(qpath)
        }
        None => None,
    };
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok((qpath, entries))
}

fn create_free(dir: &Path, base: &str) -> io::Result<(PathBuf, File)> {
    let mut n = 1;
    loop {
        let path = if n == 1 {
            dir.join(base)
        } else {
            dir.join(format!("{base}-{n}"))
        };
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Copies bytes [start, end) of `src` (with their interior newlines) to `out`.
fn copy(src: &File, start: u64, end: u64, out: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0; 64 * 1024.min((end - start) as usize)];
    let mut at = start;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        src.read_exact_at(&mut buf[..n], at)?;
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
