//! Tests of `supervisor/events/recovery.rs`.

use std::collections::BTreeSet;
use std::io::Write as _;

use serde_json::{Value, json};

use super::*;
use crate::events::{Limits, Router};

/// A directory holding events 1..=n from a router that was shut down cleanly.
fn log_of(n: i64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, _) = Router::open(dir.path(), Limits::default()).unwrap();
    for i in 0..n {
        r.publish(
            "NEW_GAMES_AVAILABLE",
            json!({"config_key": "hex8_2p", "new_games": i}),
            "test",
        )
        .unwrap();
    }
    r.save().unwrap();
    dir
}

fn append(dir: &Path, name: &str, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join(name))
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// The log line of event `seq` with its sequence number changed.
fn line_with_seq(dir: &Path, seq: u64, new_seq: u64) -> Vec<u8> {
    let text = std::fs::read_to_string(dir.join("events.log")).unwrap();
    let mut v: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["seq"] == seq)
        .unwrap();
    v["seq"] = new_seq.into();
    let mut out = serde_json::to_vec(&v).unwrap();
    out.push(b'\n');
    out
}

fn reopen(dir: &Path) -> (Router, Vec<String>) {
    Router::open(dir, Limits::default()).unwrap()
}

fn seqs(r: &Router) -> Vec<u64> {
    r.query(0, &BTreeSet::new(), None)
        .events
        .iter()
        .map(|e| e.seq)
        .collect()
}

fn quarantine(r: &Router) -> Vec<u8> {
    let q = &r.info().quarantined;
    assert_eq!(q.len(), 1, "{q:?}");
    std::fs::read(&q[0]).unwrap()
}

fn publish(r: &mut Router) -> u64 {
    r.publish("TRAINING_STARTED", json!({"config_key": "hex8_2p"}), "test")
        .unwrap()
        .seq
}

/// Every line of events.log is an event again.
fn assert_clean(dir: &Path) {
    let text = std::fs::read(dir.join("events.log")).unwrap();
    assert_eq!(text.last(), Some(&b'\n'));
    for l in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<ringrift::events::Event>(l).unwrap();
    }
    let (_, warnings) = reopen(dir);
    assert!(
        warnings.is_empty(),
        "a second start finds nothing: {warnings:?}"
    );
}

#[test]
fn a_line_that_is_not_utf8_is_moved_aside_and_the_rest_kept() {
    let dir = log_of(5);
    let six = line_with_seq(dir.path(), 5, 6);
    append(dir.path(), "events.log", b"\xff\n");
    append(dir.path(), "events.log", &six);
    let (mut r, warnings) = reopen(dir.path());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("1 damaged line(s) (1 not an event"),
        "{warnings:?}"
    );
    assert_eq!(quarantine(&r), b"\xff\n");
    assert!(
        r.info().quarantined[0].contains("events.log.damaged-"),
        "{:?}",
        r.info().quarantined
    );
    assert_eq!(
        seqs(&r),
        vec![1, 2, 3, 4, 5, 6],
        "good events on both sides"
    );
    assert_eq!(publish(&mut r), 7);
    drop(r);
    assert_clean(dir.path());
}

#[test]
fn a_torn_last_line_is_moved_aside_and_the_next_event_starts_a_fresh_line() {
    let dir = log_of(3);
    append(dir.path(), "events.log", br#"{"seq":4,"id":"x","ty"#);
    let (mut r, warnings) = reopen(dir.path());
    assert!(warnings[0].contains("1 torn last line"), "{warnings:?}");
    assert_eq!(quarantine(&r), b"{\"seq\":4,\"id\":\"x\",\"ty\n");
    assert_eq!(publish(&mut r), 4);
    assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
    drop(r);
    assert_clean(dir.path());
}

#[test]
fn a_complete_last_line_without_its_newline_is_kept() {
    let dir = log_of(3);
    let path = dir.path().join("events.log");
    let mut text = std::fs::read(&path).unwrap();
    text.pop();
    std::fs::write(&path, text).unwrap();
    let (mut r, warnings) = reopen(dir.path());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(r.info().quarantined.is_empty());
    assert_eq!(publish(&mut r), 4);
    assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
    drop(r);
    assert_clean(dir.path());
}

#[test]
fn garbage_is_moved_aside_byte_for_byte() {
    let dir = log_of(3);
    // Binary noise with NULs, newlines, invalid UTF-8 and a line far too long.
    let mut garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    garbage.extend(std::iter::repeat_n(b'z', MAX_LINE_BYTES + 10));
    garbage.push(b'\n');
    let four = line_with_seq(dir.path(), 3, 4);
    append(dir.path(), "events.log", &garbage);
    append(dir.path(), "events.log", &four);
    let (mut r, warnings) = reopen(dir.path());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("longer than 2 MiB"), "{warnings:?}");
    assert_eq!(quarantine(&r), garbage);
    assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
    assert_eq!(publish(&mut r), 5);
    drop(r);
    assert_clean(dir.path());
}

#[test]
fn repeated_backward_and_absurd_sequence_numbers_are_moved_aside() {
    let dir = log_of(5);
    let dup = line_with_seq(dir.path(), 2, 2);
    let back = line_with_seq(dir.path(), 1, 1);
    // Within the jump bound, but the next line goes back below it.
    let spike = line_with_seq(dir.path(), 3, 1000);
    let good = line_with_seq(dir.path(), 4, 6);
    let huge = line_with_seq(dir.path(), 5, u64::MAX);
    for l in [&dup, &back, &spike, &good, &huge] {
        append(dir.path(), "events.log", l);
    }
    let (mut r, warnings) = reopen(dir.path());
    assert!(
        warnings[0].contains("4 damaged line(s)")
            && warnings[0].contains("3 sequence number repeated or out of order")
            && warnings[0].contains("1 sequence number out of range"),
        "{warnings:?}"
    );
    assert_eq!(quarantine(&r), [dup, back, spike, huge].concat());
    assert_eq!(seqs(&r), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(publish(&mut r), 7, "above every good event, not the spike");
}

#[test]
fn a_spike_on_the_first_line_does_not_cost_the_lines_after_it() {
    let dir = log_of(3);
    let path = dir.path().join("events.log");
    let spike = line_with_seq(dir.path(), 1, 999_999_999);
    let rest = std::fs::read(&path).unwrap();
    std::fs::write(&path, [spike.clone(), rest].concat()).unwrap();
    let (mut r, _) = reopen(dir.path());
    assert_eq!(quarantine(&r), spike);
    assert_eq!(seqs(&r), vec![1, 2, 3]);
    assert_eq!(publish(&mut r), 4);
}

#[test]
fn damage_in_the_previous_file_gets_its_own_quarantine() {
    let dir = log_of(4);
    std::fs::rename(
        dir.path().join("events.log"),
        dir.path().join("events.log.1"),
    )
    .unwrap();
    append(dir.path(), "events.log.1", b"\x00\x01garbage\n");
    let (r, _) = reopen(dir.path());
    assert!(r.info().quarantined[0].contains("events.log.1.damaged-"));
    assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
}

#[test]
fn sequence_numbers_are_not_reused_when_the_whole_log_is_damaged() {
    let dir = log_of(50);
    std::fs::write(dir.path().join("events.log"), b"\xff\xfe not a log\n").unwrap();
    let (mut r, _) = reopen(dir.path());
    assert!(seqs(&r).is_empty());
    assert_eq!(
        publish(&mut r),
        51,
        "the high-water mark in state.json still counts"
    );
}

#[test]
fn damaged_subscribers_json_is_moved_aside_and_subscribers_start_from_the_oldest_event() {
    let dir = log_of(5);
    std::fs::write(
        dir.path().join("subscribers.json"),
        b"{\"a\": {\"types\": [",
    )
    .unwrap();
    let (mut r, warnings) = reopen(dir.path());
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("subscribers.json is damaged")),
        "{warnings:?}"
    );
    assert!(r.info().quarantined[0].contains("subscribers.json.damaged-"));
    assert_eq!(quarantine(&r), b"{\"a\": {\"types\": [");
    let (tx, mut rx) = crate::ipc::ConnTx::new(1 << 30);
    r.subscribe("a", &["NEW_GAMES_AVAILABLE".into()], tx)
        .unwrap();
    let mut got = Vec::new();
    while let Some(ringrift::protocol::FromSupervisor::Event { event }) = rx.try_frame() {
        got.push(event.seq);
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5], "redelivered, not lost");
    // The choice outlives a restart: a subscriber not seen yet still starts from the oldest.
    r.save().unwrap();
    drop(r);
    let (mut r, warnings) = reopen(dir.path());
    assert!(warnings.is_empty(), "{warnings:?}");
    let (tx, mut rx) = crate::ipc::ConnTx::new(1 << 30);
    r.subscribe("b", &["NEW_GAMES_AVAILABLE".into()], tx)
        .unwrap();
    assert!(rx.try_frame().is_some());
}

#[test]
fn subscriber_positions_beyond_any_sequence_number_are_damage() {
    let dir = log_of(2);
    std::fs::write(
        dir.path().join("subscribers.json"),
        format!(r#"{{"a": {{"types": [], "acked": {}}}}}"#, u64::MAX),
    )
    .unwrap();
    let (mut r, warnings) = reopen(dir.path());
    assert!(warnings[0].contains("out of range"), "{warnings:?}");
    assert_eq!(publish(&mut r), 3);
}

#[test]
fn a_directory_that_cannot_be_created_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events");
    std::fs::write(&file, b"").unwrap();
    let e = Router::open(&file, Limits::default()).err().unwrap();
    assert!(
        matches!(&e, super::super::OpenError::CreateDir { dir, .. } if *dir == file),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with(&format!(
            "cannot create the event directory {}: ",
            file.display()
        )),
        "{e}"
    );
}

/// Files as the previous version wrote them (no state.json yet) must load as they are.
#[test]
fn files_of_the_previous_version_load_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("events.log"),
        concat!(
            r#"{"seq":1,"id":"6930b1e0a7b1f2a-1","type":"NEW_GAMES_AVAILABLE","payload":{"config_key":"hex8_2p","new_games":100},"source":"cli","timestamp":"2026-11-28T08:30:00.123Z"}"#,
            "\n",
            r#"{"seq":2,"id":"6930b1e0a7b1f2a-2","type":"DAEMON_STARTED","payload":{"daemon":"auto_sync","pid":4243},"source":"supervisor","timestamp":"2026-11-28T08:30:00.200Z"}"#,
            "\n",
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("subscribers.json"),
        r#"{
  "auto_export": {
"types": [
  "NEW_GAMES_AVAILABLE"
],
"acked": 0
  }
}"#,
    )
    .unwrap();
    let (mut r, warnings) = reopen(dir.path());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(seqs(&r), vec![1, 2]);
    assert_eq!(r.backlog("auto_export").1, 1);
    let (tx, mut rx) = crate::ipc::ConnTx::new(1 << 30);
    r.subscribe("auto_export", &["NEW_GAMES_AVAILABLE".into()], tx)
        .unwrap();
    match rx.try_frame() {
        Some(ringrift::protocol::FromSupervisor::Event { event }) => {
            assert_eq!(event.id, "6930b1e0a7b1f2a-1");
            assert_eq!(event.payload["new_games"], 100);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(publish(&mut r), 3);
}
