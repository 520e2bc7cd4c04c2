//! Issue 11: files of today's durable formats (tests/fixtures, see its README) load in this
//! version. The event log and the subscribers' positions are recovered by a supervisor that finds
//! them in a fresh root, and a saved status report reads into the library's types.
//!
//! Fixtures are read as an older version wrote them: without insisting, as `parse_status` does for
//! live output, that they carry every field of today's types (later versions may add some).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

const EVENTS_LOG: &str = include_str!("../fixtures/events.log");
const SUBSCRIBERS: &str = include_str!("../fixtures/subscribers.json");
const STATUS: &str = include_str!("../fixtures/status.json");

fn fixture_events() -> Vec<Event> {
    EVENTS_LOG
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn an_event_log_and_subscriber_positions_from_the_fixtures_are_recovered() {
    let fixture = fixture_events();
    let newest = fixture.last().unwrap().seq;
    let subscribers: Value = serde_json::from_str(SUBSCRIBERS).unwrap();
    let acked = subscribers["sub"]["acked"].as_u64().unwrap();
    let ids = |after_ack: bool| -> BTreeSet<String> {
        fixture
            .iter()
            .filter(|e| e.event_type == "NEW_GAMES_AVAILABLE" && (e.seq > acked) == after_ack)
            .map(|e| e.id.clone())
            .collect()
    };
    let (owed, delivered) = (ids(true), ids(false));
    assert_eq!((owed.len(), delivered.len()), (2, 2), "the fixture's story");

    let root = Root::with_config(&format!(
        "http:\n  enabled: false\ndaemons:\n  sub:\n    command: [\"{WORKER}\", \"fault\", \"--subscribe\", \"NEW_GAMES_AVAILABLE\"]\n    protocol: true\n    heartbeat_interval: 0.2\n  idle:\n    command: [\"sleep\", \"1000\"]\n"
    ));
    let dir = root.path().join("data/events");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("events.log"), EVENTS_LOG).unwrap();
    std::fs::write(dir.join("subscribers.json"), SUBSCRIBERS).unwrap();
    root.ok(&["start", "idle"]);

    // Every event as it was written, before what this supervisor adds; nothing moved aside.
    let listed = root.events(&[]);
    assert!(listed.len() > fixture.len(), "{listed:#?}");
    assert_eq!(listed[..fixture.len()], fixture[..]);
    assert!(listed[fixture.len()..].iter().all(|e| e.seq > newest));
    let status = root.status();
    assert!(status.events.quarantined.is_empty(), "{:#?}", status.events);
    assert!(status.events.last_seq > newest);
    // `sub` is not running: it is owed the events after its ack, and only those.
    let sub = daemon(&status, "sub");
    assert_eq!(sub.state, DaemonState::Stopped);
    assert_eq!(sub.subscriptions, ["NEW_GAMES_AVAILABLE"], "{sub:#?}");
    assert_eq!(sub.event_backlog, 2, "{sub:#?}");

    root.ok(&["start", "sub"]);
    let mut got = Vec::new();
    let all_owed = wait_until(T, || {
        got = received_ids(&root, "sub");
        owed.iter().all(|id| got.contains(id))
    });
    assert!(all_owed, "sub received {got:?}, owed {owed:?}");
    root.wait_daemon("sub", T, |d| d.event_backlog == 0);
    let got = received_ids(&root, "sub");
    assert!(
        got.iter().all(|id| !delivered.contains(id)),
        "events acked before are not sent again: {got:?}"
    );

    // New events are numbered above the recovered ones.
    let out = root.ok(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        r#"{"config_key": "hex8_2p", "new_games": 5}"#,
    ]);
    assert!(out.contains("accepted"), "{out}");
    let last = root.events_of("NEW_GAMES_AVAILABLE").last().unwrap().seq;
    assert!(last > newest, "{last} > {newest}");
}

#[test]
fn a_status_report_from_the_fixtures_reads_into_the_library_types() {
    let s: StatusReport =
        serde_json::from_str(STATUS).expect("status.json reads as a StatusReport");
    assert!(s.supervisor.pid > 0 && !s.supervisor.version.is_empty());
    assert!(
        s.supervisor
            .config_path
            .ends_with("config/unified_loop.yaml")
    );
    assert!(s.supervisor.http.is_some() && s.supervisor.http_error.is_none());
    assert!(s.daemons.len() > 3, "the built-in daemons are listed too");

    let idle = daemon(&s, "idle");
    assert_eq!(
        (idle.state, idle.kind.as_str()),
        (DaemonState::Running, "external")
    );
    assert!(idle.pid.is_some() && idle.uptime_secs.is_some());
    assert_eq!(idle.health.status, "running");

    let sub = daemon(&s, "sub");
    assert_eq!(sub.state, DaemonState::Stopped);
    assert_eq!((sub.pid, sub.last_exit.as_deref()), (None, Some("exit 0")));
    assert_eq!(sub.subscriptions, ["NEW_GAMES_AVAILABLE"]);
    assert_eq!(sub.event_backlog, 2);

    let jobber = daemon(&s, "jobber");
    assert_eq!(jobber.state, DaemonState::Running);
    assert!(jobber.heartbeat_age_secs.is_some());
    assert_eq!(jobber.progress.get("cycles"), Some(&0));
    assert_eq!(s.jobs.len(), 1);
    let job = &s.jobs[0];
    assert_eq!(job.daemon, "jobber");
    assert!(job.id.starts_with("jobber-"), "{job:?}");
    assert_eq!(job.command, ["sh", "-c", "exec sleep 1000"]);
    assert_eq!(job.max_runtime_secs, 600.0);

    assert_eq!(s.events.last_seq, 9);
    assert!(s.events.log_path.ends_with("data/events/events.log"));
    assert!(s.events.quarantined.is_empty());
    // The events of the fixture's log up to that moment are the ones the report counted.
    let counted: Vec<u64> = fixture_events()
        .iter()
        .map(|e| e.seq)
        .filter(|&seq| seq <= s.events.last_seq)
        .collect();
    assert_eq!(counted, (1..=9).collect::<Vec<_>>());
}
