//! Issue 4: events between daemon processes — typed, durable, delivered at least once.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

fn worker(name: &str, args: &[&str], extra: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{:?}", a)).collect();
    format!(
        "  {name}:\n    command: [\"{WORKER}\", \"fault\", {}]\n    protocol: true\n    heartbeat_interval: 0.2\n{extra}",
        args.join(", ")
    )
}

#[test]
fn an_event_reaches_every_subscriber_and_a_restarted_one_misses_nothing() {
    const N: usize = 30;
    let yaml = format!(
        "daemons:\n{}{}{}",
        worker("sub_a", &["--subscribe", "NEW_GAMES_AVAILABLE"], ""),
        worker(
            "sub_b",
            &["--subscribe", "new_games_available"],
            "    backoff_initial: 1500ms\n"
        ),
        worker(
            "publisher",
            &[
                "--emit",
                "NEW_GAMES_AVAILABLE",
                "--emit-payload",
                r#"{"config_key": "hex8_2p", "new_games": {i}}"#,
                "--emit-count",
                "30"
            ],
            "    interval: 0.1\n"
        ),
    );
    let root = Root::with_config(&yaml);
    root.ok(&["start", "sub_a", "sub_b"]);
    // Both subscriptions are registered once each has said so in the supervisor's log.
    assert!(wait_until(T, || {
        let log = root.master_log();
        log.contains("sub_a: subscribed to") && log.contains("sub_b: subscribed to")
    }));
    root.ok(&["start", "publisher"]);
    let published = |root: &Root| root.events_of("NEW_GAMES_AVAILABLE");
    assert!(wait_until(T, || published(&root).len() >= 8));
    let victim = root.pid("sub_b").unwrap();
    signal(victim, SIGKILL);
    assert!(
        wait_until(T, || published(&root).len() == N),
        "the publisher finishes"
    );
    assert!(wait_until(T, || root
        .pid("sub_b")
        .is_some_and(|p| p != victim)
        && root.state("sub_b") == DaemonState::Running));

    let all = published(&root);
    let expected: BTreeSet<String> = all.iter().map(|e| e.id.clone()).collect();
    assert_eq!(expected.len(), N);
    for e in &all {
        assert_eq!(e.source, "publisher");
        assert_eq!(e.payload["config_key"], "hex8_2p");
    }
    for name in ["sub_a", "sub_b"] {
        let mut got = Vec::new();
        let complete = wait_until(T, || {
            got = received_ids(&root, name);
            got.iter().cloned().collect::<BTreeSet<_>>() == expected
        });
        assert!(
            complete,
            "{name} received {} of {N} distinct events",
            got.iter().collect::<BTreeSet<_>>().len()
        );
        let distinct: BTreeSet<&String> = got.iter().collect();
        assert_eq!(
            distinct.len(),
            N,
            "{name}: each event exactly once after dropping duplicates by id"
        );
    }
    // Nothing is left unacked.
    assert!(
        wait_until(T, || root.daemon("sub_b").event_backlog == 0),
        "{:#?}",
        root.daemon("sub_b")
    );
    assert_eq!(
        root.daemon("sub_a")
            .subscriptions
            .first()
            .map(String::as_str),
        Some("NEW_GAMES_AVAILABLE")
    );
}

#[test]
fn a_misnamed_payload_field_is_refused_with_its_name() {
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    let out = root.run(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        r#"{"config": "hex8_2p", "new_games": 1}"#,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("unknown field 'config' (did you mean 'config_key'?)"),
        "{err}"
    );
    let out = root.run(&["emit", "TRAINING_STARTD", r#"{"config_key": "hex8_2p"}"#]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("did you mean TRAINING_STARTED"),
        "{}",
        stderr(&out)
    );
    let ok = root.ok(&[
        "emit",
        "new_games_available",
        r#"{"config_key": "hex8_2p", "new_games": 5}"#,
    ]);
    assert!(ok.contains("NEW_GAMES_AVAILABLE accepted: seq"), "{ok}");
    let listed = root.events_of("NEW_GAMES_AVAILABLE");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].source, "cli");
}

#[test]
fn only_the_owner_of_a_step_may_announce_it_and_the_origin_cannot_be_claimed() {
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    // A step's result (training, evaluation, promotion) or a lifecycle fact: not from the CLI.
    for (event_type, payload, owner) in [
        (
            "EVALUATION_COMPLETED",
            r#"{"config_key":"hex8_2p","model_path":"/tmp/x/hex8_2p/evil.bin","win_rate_vs_random":1,"win_rate_vs_baseline":1,"games":1000}"#,
            "only evaluation may",
        ),
        (
            "LOW_QUALITY_DATA_WARNING",
            r#"{"config_key":"hex8_2p","score":0.1,"threshold":0.5}"#,
            "only quality_monitor may",
        ),
        (
            "DAEMON_FAILED",
            r#"{"daemon":"auto_sync","reason":"forged"}"#,
            "only the supervisor may",
        ),
    ] {
        let out = root.run(&["emit", event_type, payload]);
        assert_eq!(out.status.code(), Some(1), "{event_type}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("cli may not emit {event_type}")) && err.contains(owner),
            "{err}"
        );
        assert!(root.events_of(event_type).is_empty());
    }
    // A frame that claims another source is stamped with where it really came from.
    let mut conn =
        std::os::unix::net::UnixStream::connect(root.path().join("run/supervisor.sock")).unwrap();
    use std::io::Write as _;
    conn.write_all(
        b"{\"type\":\"hello\",\"protocol\":1,\"role\":\"cli\"}\n\
          {\"type\":\"emit\",\"event_type\":\"NEW_GAMES_AVAILABLE\",\"payload\":{\"config_key\":\"hex8_2p\",\"new_games\":1},\"source\":\"selfplay_scheduler\"}\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    assert!(wait_until(T, || {
        seen = root.events_of("NEW_GAMES_AVAILABLE");
        !seen.is_empty()
    }));
    assert_eq!(seen[0].source, "cli");
}

#[test]
fn the_supervisor_announces_daemons_and_the_log_survives_a_restart() {
    let root = Root::with_config(&format!(
        "daemons:\n{}",
        worker(
            "crashy",
            &["--crash-after-ms", "300"],
            "    max_restarts: 1\n    restart_window: 60\n    backoff_initial: 50ms\n"
        )
    ));
    root.ok(&["start", "auto_sync"]);
    let _ = root.run(&["start", "crashy"]);
    root.wait_state("crashy", DaemonState::Failed, T);
    let types = |root: &Root| -> Vec<(String, String)> {
        root.events(&[])
            .iter()
            .map(|e| {
                (
                    e.event_type.clone(),
                    e.payload["daemon"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let seen = types(&root);
    assert!(
        seen.contains(&("DAEMON_STARTED".into(), "auto_sync".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("DAEMON_STOPPED".into(), "crashy".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("DAEMON_FAILED".into(), "crashy".into())),
        "{seen:?}"
    );
    let last = root.events(&[]).last().unwrap().seq;

    root.ok(&["shutdown"]);
    root.ok(&["start", "auto_sync"]);
    let after = root.events(&[]);
    assert!(
        after.iter().any(|e| e.seq == last),
        "old events are still there"
    );
    assert!(
        after.last().unwrap().seq > last,
        "sequence numbers continue"
    );
    // --since and -n narrow the listing.
    assert!(
        root.events(&["--since", &last.to_string()])
            .iter()
            .all(|e| e.seq > last)
    );
    assert_eq!(root.events(&["-n", "2"]).len(), 2);
}

#[test]
fn events_follow_prints_new_events_as_they_come() {
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    let follower = root.follow(&["events", "-f", "--type", "NEW_GAMES_AVAILABLE"]);
    // Emit until the follower shows it (it may connect after the first emit).
    let mut got = None;
    let found = wait_until(T, || {
        root.ok(&[
            "emit",
            "NEW_GAMES_AVAILABLE",
            r#"{"config_key": "hex8_2p", "new_games": 75}"#,
        ]);
        got = follower.lines.recv_timeout(Duration::from_millis(200)).ok();
        got.is_some()
    });
    drop(follower);
    assert!(found);
    let line = got.unwrap();
    assert!(
        line.contains("NEW_GAMES_AVAILABLE") && line.contains("75"),
        "{line}"
    );
}

#[test]
fn watch_shows_daemons_and_latest_events_and_quits_on_q() {
    use std::io::Write;
    let root = Root::new();
    root.ok(&["start", "--profile", "minimal"]);
    let frame = root.ok(&["watch", "--once"]);
    for needle in [
        "NAME",
        "CPU%",
        "RSS",
        "auto_sync",
        "RUNNING",
        "LATEST EVENTS",
        "DAEMON_STARTED",
    ] {
        assert!(frame.contains(needle), "{needle} missing:\n{frame}");
    }
    let mut child = root
        .cmd(&["watch"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"q").unwrap();
    let status = wait_exit(&mut child, T).expect("watch quits on q");
    assert!(status.success());
}

#[test]
fn node_health_reports_a_degraded_node_and_publishes_the_change() {
    let root = Root::with_config(&format!(
        "daemons:\n  unified_node_health:\n    interval: 0.2\n    heartbeat_interval: 0.1\n    min_free_disk_gb: 1000000000\n{}",
        worker(
            "broken",
            &["--exit-immediately"],
            "    max_restarts: 1\n    backoff_initial: 10ms\n"
        )
    ));
    let _ = root.run(&["start", "broken"]);
    root.ok(&["start", "unified_node_health"]);
    let health = root.wait_health("unified_node_health", T, |h| h.status == "degraded");
    let message = &health.message;
    assert!(message.contains("GB free on the root's disk"), "{message}");
    assert!(message.contains("broken FAILED"), "{message}");
    let changes = root.events_of("NODE_HEALTH_CHANGED");
    assert_eq!(changes[0].payload["healthy"], false, "{changes:?}");
    assert_eq!(
        root.state("unified_node_health"),
        DaemonState::Running,
        "a degraded node is reported, not a crashed daemon"
    );
}

#[test]
fn a_restart_without_delay_is_announced_as_a_stop_and_a_start() {
    let root = Root::with_config(&format!(
        "daemons:\n{}",
        worker("quick", &[], "    backoff_initial: 0\n")
    ));
    root.ok(&["start", "quick"]);
    let pid = root.pid("quick").unwrap();
    signal(pid, SIGKILL);
    assert!(wait_until(T, || root
        .pid("quick")
        .is_some_and(|p| p != pid)
        && root.state("quick") == DaemonState::Running));
    let mut seen = Vec::new();
    assert!(
        wait_until(T, || {
            seen = root
                .events(&[])
                .into_iter()
                .filter(|e| e.payload["daemon"] == "quick")
                .map(|e| e.event_type)
                .collect();
            seen == ["DAEMON_STARTED", "DAEMON_STOPPED", "DAEMON_STARTED"]
        }),
        "{seen:?}"
    );
}

/// A control-socket client speaking the protocol directly: many requests on one connection,
/// without a process start-up each.
struct Conn {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    frames: ringrift::protocol::FrameReader,
}

impl Conn {
    fn open(root: &Root) -> Conn {
        use ringrift::protocol::{FromSupervisor, Hello, Opening, PROTOCOL_VERSION, Role};
        let stream =
            std::os::unix::net::UnixStream::connect(root.path().join("run/supervisor.sock"))
                .unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let mut c = Conn {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            frames: ringrift::protocol::FrameReader::new(),
        };
        c.send(&Opening::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Cli,
            daemon: None,
            pid: None,
        }));
        assert!(matches!(c.recv(), FromSupervisor::Welcome { .. }));
        c
    }

    fn send<F: serde::Serialize>(&mut self, frame: &F) {
        use std::io::Write;
        self.writer
            .write_all(&ringrift::protocol::encode(frame))
            .unwrap();
    }

    fn recv(&mut self) -> ringrift::protocol::FromSupervisor {
        let frame = self.frames.read_blocking(&mut self.reader).unwrap();
        ringrift::protocol::decode(
            frame
                .expect("the supervisor kept the connection open")
                .unwrap(),
        )
        .unwrap()
    }

    /// Emits `n` NEW_GAMES_AVAILABLE events with a `pad`-byte path each, a batch at a time.
    fn flood(&mut self, n: usize, pad: usize) {
        use ringrift::protocol::{Emit, FromSupervisor, Request};
        let path = "p".repeat(pad);
        let mut sent = 0;
        while sent < n {
            let batch = (n - sent).min(500);
            for i in 0..batch {
                self.send(&Request::Emit(Emit {
                    event_type: "NEW_GAMES_AVAILABLE".into(),
                    payload: serde_json::json!({
                        "config_key": "hex8_2p", "new_games": sent + i, "db_path": path
                    }),
                    source: None,
                }));
            }
            for _ in 0..batch {
                match self.recv() {
                    FromSupervisor::Emitted { .. } => {}
                    other => panic!("emit refused: {other:?}"),
                }
            }
            sent += batch;
        }
    }
}

#[test]
fn a_damaged_event_log_is_moved_aside_and_the_supervisor_starts() {
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    root.ok(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        r#"{"config_key": "hex8_2p", "new_games": 1}"#,
    ]);
    let before = root.events(&[]);
    let last = before.last().unwrap().seq;
    root.ok(&["shutdown"]);
    {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(root.path().join("data/events/events.log"))
            .unwrap();
        log.write_all(b"\xff\n").unwrap();
    }
    root.ok(&["start", "auto_sync"]);
    let text = root.ok(&["status"]);
    assert!(
        text.contains("events: damaged data was moved aside at start-up")
            && text.contains("events.log.damaged-"),
        "{text}"
    );
    let quarantined = root.status().events.quarantined;
    assert_eq!(std::fs::read(&quarantined[0]).unwrap(), b"\xff\n");
    root.assert_logged("1 damaged line(s)");
    let out = root.ok(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        r#"{"config_key": "hex8_2p", "new_games": 2}"#,
    ]);
    let seq: u64 = out
        .split("seq ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(seq > last, "{seq} > {last}");
    let after = root.events(&[]);
    for e in &before {
        assert!(after.contains(e), "old event kept: {e:?}");
    }
    assert!(after.iter().any(|e| e.seq == seq));
}

#[test]
fn start_names_the_reason_when_the_supervisor_cannot_boot() {
    let root = Root::new();
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    std::fs::write(root.path().join("data/events"), b"not a directory").unwrap();
    let out = root.run(&["start", "auto_sync"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("exited during start-up")
            && err.contains("cannot open the event log: cannot create the event directory")
            && err.contains("File exists"),
        "{err}"
    );
}

#[test]
fn supervisor_memory_stays_flat_under_event_churn() {
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    let pid = root.supervisor_pid().unwrap();
    let mut conn = Conn::open(&root);
    // Warm up: allocator pools, caches, the first pages of the index.
    conn.flood(5_000, 1000);
    let warm = rss_kib(pid);
    conn.flood(20_000, 1000);
    let after = rss_kib(pid);
    assert!(
        after < warm + 4096,
        "RSS grew from {warm} KiB to {after} KiB over 20,000 events of 1 KB"
    );
    assert!(root.status().events.last_seq >= 25_000);
}

#[test]
fn events_answers_in_pages_and_the_cli_pages_through() {
    use ringrift::protocol::{EventsRequest, FromSupervisor, Request};
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    let mut conn = Conn::open(&root);
    conn.flood(2_500, 10);
    let only = vec!["NEW_GAMES_AVAILABLE".to_string()];
    conn.send(&Request::Events(EventsRequest {
        since: None,
        types: only.clone(),
        follow: false,
        limit: None,
    }));
    let mut page = Vec::new();
    let next = loop {
        match conn.recv() {
            FromSupervisor::Event { event } => page.push(event.seq),
            FromSupervisor::EndOfEvents { next_since, .. } => break next_since,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(page.len(), 1000);
    assert_eq!(next, page.last().copied(), "the cursor of the next page");

    let seqs = |extra: &[&str]| -> Vec<u64> {
        let mut args = vec!["--type", "NEW_GAMES_AVAILABLE"];
        args.extend_from_slice(extra);
        root.events(&args).iter().map(|e| e.seq).collect()
    };
    let all = seqs(&[]);
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seqs(&["-n", "1500"]), all[1000..]);
    let since = all[200].to_string();
    assert_eq!(seqs(&["--since", &since]), all[201..]);

    // Following pages through the history first, then prints new events.
    let follower = root.follow(&["events", "-f", "--json", "--type", "NEW_GAMES_AVAILABLE"]);
    let mut followed = Vec::new();
    let history = wait_until(T, || {
        followed.extend(follower.lines.try_iter());
        followed.len() >= 2500
    });
    // Emit until the follower shows a new one (it may still be registering).
    let new = history
        && wait_until(T, || {
            conn.flood(1, 10);
            followed.extend(follower.lines.recv_timeout(Duration::from_millis(200)));
            followed.len() > 2500
        });
    drop(follower);
    assert!(history && new, "followed {} lines", followed.len());
    let seen: Vec<u64> = followed.iter().map(|l| parse_event(l).seq).collect();
    assert_eq!(seen[..2500], all[..]);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
}
