//! Issue 4: events between daemon processes — typed, durable, delivered at least once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn worker(name: &str, args: &[&str], extra: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{:?}", a)).collect();
    format!(
        "  {name}:\n    command: [\"{WORKER}\", \"fault\", {}]\n    protocol: true\n    heartbeat_interval: 0.2\n{extra}",
        args.join(", ")
    )
}

fn events_json(root: &Root, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["events", "--json"];
    args.extend_from_slice(extra);
    root.ok(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Event ids a fault worker printed in its log (all its incarnations), in order.
fn received_ids(root: &Root, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root.log_path(name)).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("type=NEW_GAMES_AVAILABLE"))
        .filter_map(|l| {
            l.split(" id=")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_string)
        })
        .collect()
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
    let published = |root: &Root| events_json(root, &["--type", "NEW_GAMES_AVAILABLE"]);
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
        && root.state("sub_b") == "RUNNING"));

    let all: Vec<Value> = published(&root);
    let expected: BTreeSet<String> = all
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(expected.len(), N);
    for e in &all {
        assert_eq!(e["source"], "publisher");
        assert_eq!(e["payload"]["config_key"], "hex8_2p");
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
        wait_until(T, || root.daemon("sub_b")["event_backlog"] == 0),
        "{:#}",
        root.daemon("sub_b")
    );
    assert_eq!(
        root.daemon("sub_a")["subscriptions"][0],
        "NEW_GAMES_AVAILABLE"
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
    let listed = events_json(&root, &["--type", "NEW_GAMES_AVAILABLE"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["source"], "cli");
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
        assert!(events_json(&root, &["--type", event_type]).is_empty());
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
        seen = events_json(&root, &["--type", "NEW_GAMES_AVAILABLE"]);
        !seen.is_empty()
    }));
    assert_eq!(seen[0]["source"], "cli");
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
    assert!(wait_until(T, || root.state("crashy") == "FAILED"));
    let types = |root: &Root| -> Vec<(String, String)> {
        events_json(root, &[])
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["payload"]["daemon"].as_str().unwrap_or("").to_string(),
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
    let last = events_json(&root, &[]).last().unwrap()["seq"]
        .as_u64()
        .unwrap();

    root.ok(&["shutdown"]);
    root.ok(&["start", "auto_sync"]);
    let after = events_json(&root, &[]);
    assert!(
        after.iter().any(|e| e["seq"].as_u64() == Some(last)),
        "old events are still there"
    );
    assert!(
        after.last().unwrap()["seq"].as_u64().unwrap() > last,
        "sequence numbers continue"
    );
    // --since and -n narrow the listing.
    assert!(
        events_json(&root, &["--since", &last.to_string()])
            .iter()
            .all(|e| e["seq"].as_u64().unwrap() > last)
    );
    assert_eq!(events_json(&root, &["-n", "2"]).len(), 2);
}

#[test]
fn events_follow_prints_new_events_as_they_come() {
    use std::io::{BufRead, BufReader};
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    let mut child = root
        .cmd(&["events", "-f", "--type", "NEW_GAMES_AVAILABLE"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Emit until the follower shows it (it may connect after the first emit).
    let mut got = None;
    let found = wait_until(T, || {
        root.ok(&[
            "emit",
            "NEW_GAMES_AVAILABLE",
            r#"{"config_key": "hex8_2p", "new_games": 75}"#,
        ]);
        got = rx.recv_timeout(Duration::from_millis(200)).ok();
        got.is_some()
    });
    let _ = child.kill();
    let _ = child.wait();
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
    let mut status = None;
    assert!(
        wait_until(T, || {
            status = child.try_wait().unwrap();
            status.is_some()
        }),
        "watch quits on q"
    );
    assert!(status.unwrap().success());
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
    let mut d = serde_json::Value::Null;
    assert!(
        wait_until(T, || {
            d = root.daemon("unified_node_health");
            d["health"]["status"] == "degraded"
        }),
        "{d:#}"
    );
    let message = d["health"]["message"].as_str().unwrap();
    assert!(message.contains("GB free on the root's disk"), "{message}");
    assert!(message.contains("broken FAILED"), "{message}");
    let changes = events_json(&root, &["--type", "NODE_HEALTH_CHANGED"]);
    assert_eq!(changes[0]["payload"]["healthy"], false, "{changes:?}");
    assert_eq!(
        root.state("unified_node_health"),
        "RUNNING",
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
        && root.state("quick") == "RUNNING"));
    let mut seen = Vec::new();
    assert!(
        wait_until(T, || {
            seen = events_json(&root, &[])
                .iter()
                .filter(|e| e["payload"]["daemon"] == "quick")
                .map(|e| e["type"].as_str().unwrap().to_string())
                .collect();
            seen == ["DAEMON_STARTED", "DAEMON_STOPPED", "DAEMON_STARTED"]
        }),
        "{seen:?}"
    );
}
