//! Tests of `supervisor/events.rs`.

use serde_json::json;

use super::*;

/// Opens a router that found nothing damaged.
fn open(dir: &Path, limits: Limits) -> Router {
    let (r, warnings) = Router::open(dir, limits).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    r
}

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
    let mut r = open(dir.path(), Limits::default());
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
    let mut r = open(dir.path(), Limits::default());
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
    let mut r = open(dir.path(), Limits::default());
    let e = r
        .publish("TRAINING_STARTED", json!({"config": "hex8_2p"}), "test")
        .unwrap_err();
    assert!(matches!(e, PublishError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("'config'"), "{e}");
    assert_eq!(r.info().last_seq, 0);
}

#[test]
fn unknown_event_types_cannot_be_subscribed_to() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
    let (tx, _rx) = crate::ipc::ConnTx::new(1 << 30);
    let e = r
        .subscribe("a", &["NEW_GAMES_AVAILABLE".into(), "new_gamez".into()], tx)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot subscribe to unknown event type 'new_gamez'"
    );
}

#[test]
fn a_slow_subscriber_is_bounded_by_its_window_and_does_not_hold_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
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
    let mut r = open(
        dir.path(),
        Limits {
            max_log_bytes: 2000,
            max_retained: 10,
        },
    );
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
    let r = open(
        dir.path(),
        Limits {
            max_log_bytes: 2000,
            max_retained: 10,
        },
    );
    assert_eq!(r.info().last_seq, 50);
}

#[test]
fn queries_filter_by_type_and_since() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
    for i in 0..5 {
        r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
        r.publish("TRAINING_STARTED", json!({"config_key": "hex8_2p"}), "test")
            .unwrap();
    }
    let types: BTreeSet<String> = ["TRAINING_STARTED".to_string()].into();
    let q = r.query(4, &types, None).events;
    assert_eq!(q.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 8, 10]);
    assert_eq!(r.query(0, &BTreeSet::new(), Some(2)).events.len(), 2);
}

#[test]
fn an_index_entry_is_small() {
    assert!(std::mem::size_of::<store::Entry>() <= 32);
}

#[test]
fn an_oversized_payload_is_refused_at_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
    let big = json!({"config_key": "hex8_2p", "new_games": 1, "db_path": "x".repeat(1 << 20)});
    let e = r.publish("NEW_GAMES_AVAILABLE", big, "test").unwrap_err();
    assert!(
        e.to_string().contains("more than the limit of 65536 bytes"),
        "{e}"
    );
    assert_eq!(r.info().last_seq, 0);
    assert_eq!(std::fs::metadata(r.store.log_path()).unwrap().len(), 0);
}

#[test]
fn rotated_events_stay_readable_until_the_next_rotation_and_bytes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let limits = || Limits {
        max_log_bytes: 4000,
        max_retained: 1000,
    };
    let mut r = open(dir.path(), limits());
    let (tx, _rx) = crate::ipc::ConnTx::new(1 << 30);
    r.subscribe("late", &["NEW_GAMES_AVAILABLE".into()], tx)
        .unwrap();
    r.disconnect("late");
    for i in 0..400 {
        let ev = r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
        let line = serde_json::to_vec(&*ev).unwrap().len() as u64 + 1;
        // Every retained event can be read back, whichever file holds it.
        let q = r.query(0, &BTreeSet::new(), None);
        assert_eq!(q.events.len(), r.info().retained as usize);
        assert!(r.store.retained_bytes() <= 2 * (4000 + line));
    }
    let first = r.query(0, &BTreeSet::new(), None).events[0].seq;
    assert!(first > 300, "older generations are gone: {first}");
    assert!(dir.path().join("events.log.1").exists());
    let in_prev = r
        .store
        .index()
        .iter()
        .filter(|e| e.generation + 1 == r.store.generation())
        .count();
    assert!(in_prev > 0, "events.log.1 is part of the retained events");

    // A subscriber that was down skips what is gone and gets the rest, in order.
    let (tx, mut rx) = crate::ipc::ConnTx::new(1 << 30);
    r.subscribe("late", &["NEW_GAMES_AVAILABLE".into()], tx)
        .unwrap();
    let got = drain(&mut rx);
    assert_eq!(got.first(), Some(&first));
    assert_eq!(got.last(), Some(&400));
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1));

    // A new supervisor indexes both files the same way.
    r.save().unwrap();
    let retained = r.info().retained;
    drop(r);
    let r = open(dir.path(), limits());
    assert_eq!(r.info().retained, retained);
    assert_eq!(r.query(0, &BTreeSet::new(), None).events[0].seq, first);
}

#[test]
fn memory_is_an_index_bounded_in_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(
        dir.path(),
        Limits {
            max_log_bytes: 64 * 1024 * 1024,
            max_retained: 100,
        },
    );
    for i in 0..1000 {
        r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
    }
    assert_eq!(r.info().retained, 100);
    assert_eq!(r.store.index().front().unwrap().seq, 901);
}

#[test]
fn queries_answer_one_page_and_say_where_the_next_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
    for i in 0..2500 {
        r.publish("NEW_GAMES_AVAILABLE", games(i), "test").unwrap();
    }
    let all = BTreeSet::new();
    let seqs = |p: &Page| p.events.iter().map(|e| e.seq).collect::<Vec<_>>();
    let p = r.query(0, &all, None);
    assert_eq!(seqs(&p), (1..=1000).collect::<Vec<_>>());
    assert_eq!(p.next_since, Some(1000));
    let p = r.query(1000, &all, None);
    assert_eq!(seqs(&p), (1001..=2000).collect::<Vec<_>>());
    let p = r.query(2000, &all, None);
    assert_eq!(seqs(&p), (2001..=2500).collect::<Vec<_>>());
    assert_eq!(p.next_since, None, "the last page");

    // The newest N: a page from where N remain.
    let p = r.query(0, &all, Some(1500));
    assert_eq!(seqs(&p), (1001..=2000).collect::<Vec<_>>());
    assert_eq!(p.next_since, Some(2000));
    let p = r.query(0, &all, Some(10));
    assert_eq!(seqs(&p), (2491..=2500).collect::<Vec<_>>());
    assert_eq!(p.next_since, None);

    // Filtered: the cursor skips what does not match.
    r.publish("TRAINING_STARTED", json!({"config_key": "hex8_2p"}), "test")
        .unwrap();
    let types: BTreeSet<String> = ["TRAINING_STARTED".to_string()].into();
    let p = r.query(0, &types, None);
    assert_eq!(seqs(&p), vec![2501]);
    assert_eq!(p.next_since, None);
}

#[test]
fn a_page_is_bounded_in_bytes_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
    let big =
        |i: i64| json!({"config_key": "hex8_2p", "new_games": i, "db_path": "x".repeat(60_000)});
    for i in 0..100 {
        r.publish("NEW_GAMES_AVAILABLE", big(i), "test").unwrap();
    }
    let p = r.query(0, &BTreeSet::new(), None);
    let n = p.events.len();
    let line = serde_json::to_vec(&*p.events[0]).unwrap().len() as u64;
    assert_eq!(n as u64, MAX_PAGE_BYTES / line, "as many as fit");
    assert_eq!(p.next_since, Some(n as u64));
    let rest = r.query(n as u64, &BTreeSet::new(), None);
    assert_eq!(rest.events[0].seq, n as u64 + 1);
}

#[test]
fn an_event_with_a_fencing_token_below_one_seen_for_its_lease_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), Limits::default());
    let fence = |lease: &str, token| {
        Some(ringrift::events::Fence {
            lease: lease.into(),
            token,
        })
    };
    let promoted = json!({"config_key": "hex8_2p", "model_path": "models/x.bin"});
    let remote = |id: &str, f| Event {
        seq: 0,
        id: id.into(),
        event_type: "MODEL_PROMOTED".into(),
        payload: promoted.clone(),
        source: "auto_promotion".into(),
        timestamp: ringrift::timefmt::now_rfc3339(),
        node: None,
        fence: f,
    };
    // The old leader's event (token 5), then its successor's (token 9): both taken.
    assert!(
        r.publish_remote("node-a", remote("a-1", fence("auto_promotion.hex8_2p", 5)))
            .is_ok()
    );
    assert!(
        r.publish_remote("node-b", remote("b-1", fence("auto_promotion.hex8_2p", 9)))
            .is_ok()
    );
    // The old leader again, late (token 7 < 9): refused, not logged.
    let e = r
        .publish_remote("node-a", remote("a-2", fence("auto_promotion.hex8_2p", 7)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            PublishError::Fenced {
                token: 7,
                seen: 9,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("stale fencing token 7"), "{e}");
    // Another lease's tokens are its own; an event without a fence is not fenced.
    assert!(
        r.publish_remote(
            "node-a",
            remote("a-3", fence("auto_promotion.square8_2p", 6))
        )
        .is_ok()
    );
    assert!(r.publish_remote("node-a", remote("a-4", None)).is_ok());
    // This node's own event under the same lease: a local token below the one seen is refused too.
    let e = r
        .publish_fenced(
            "MODEL_PROMOTED",
            promoted.clone(),
            "auto_promotion",
            fence("auto_promotion.hex8_2p", 8),
        )
        .unwrap_err();
    assert!(matches!(e, PublishError::Fenced { .. }), "{e:?}");
    let ok = r
        .publish_fenced(
            "MODEL_PROMOTED",
            promoted,
            "auto_promotion",
            fence("auto_promotion.hex8_2p", 12),
        )
        .unwrap();
    assert_eq!(ok.fence.as_ref().unwrap().token, 12);
    assert_eq!(r.info().last_seq, 5);
}
