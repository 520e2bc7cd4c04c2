//! `queue list|show|retry|cancel` on the work queue (issue 13, item 1: the operator's commands),
//! with and without a running supervisor.

use std::time::Duration;

use ringrift::work_queue::Item;

use super::common::*;

const T: Duration = Duration::from_secs(20);

fn items(root: &Root, args: &[&str]) -> Vec<Item> {
    let mut all = vec!["queue", "list", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&root.ok(&all)).expect("queue list --json")
}

fn item(root: &Root, id: i64) -> Item {
    serde_json::from_str(&root.ok(&["queue", "show", &id.to_string(), "--json"]))
        .expect("queue show --json")
}

#[test]
fn an_operator_lists_shows_cancels_and_retries_work_items() {
    // No supervisor has made a queue yet: said so, exit 0.
    let root = Root::with_config(
        "http:\n  enabled: false\ndaemons:\n  queue_populator:\n    heartbeat_interval: 0.2\n",
    );
    let out = root.ok(&["queue", "list"]);
    assert!(out.contains("no work queue yet"), "{out}");

    // queue_populator fills it.
    root.ok(&["start", "queue_populator"]);
    assert!(
        wait_until(T, || root.path().join("data/work_queue.db").exists()
            && !items(&root, &[]).is_empty()),
        "{}",
        root.master_log()
    );
    let pending = items(&root, &["--status", "PENDING"]);
    assert!(
        pending
            .iter()
            .all(|i| i.status == "pending" && i.item_type == "selfplay")
    );
    let table = root.ok(&["queue", "list", "-n", "2"]);
    assert_eq!(
        table.lines().count(),
        4,
        "header, two items, counts:\n{table}"
    );
    assert!(
        table.contains("hex8_2p") && table.contains("pending "),
        "{table}"
    );
    let id = pending.last().unwrap().id;
    let text = root.ok(&["queue", "show", &id.to_string()]);
    assert!(
        text.contains(&format!("work item {id}")) && text.contains("\"games\""),
        "{text}"
    );

    // The supervisor is not needed: the CLI reads and changes the queue itself.
    root.ok(&["shutdown"]);
    let out = root.ok(&["queue", "cancel", &id.to_string()]);
    assert!(out.contains("cancelled: now failed"), "{out}");
    let cancelled = item(&root, id);
    assert_eq!(cancelled.status, "failed");
    assert_eq!(
        cancelled.error.as_deref(),
        Some("cancelled by the operator (queue cancel)")
    );
    // Twice: it no longer applies (exit 1, saying why).
    let again = root.run(&["queue", "cancel", &id.to_string()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("is failed: this applies only to an item that is pending or claimed"),
        "{again:?}"
    );
    // Retried: pending again, attempts reset, its error gone.
    root.ok(&["queue", "retry", &id.to_string()]);
    let retried = item(&root, id);
    assert_eq!((retried.status.as_str(), retried.attempts), ("pending", 0));
    assert_eq!(retried.error, None);
    let pending_retry = root.run(&["queue", "retry", &id.to_string()]);
    assert_eq!(pending_retry.status.code(), Some(1));

    // Bad input: exit 2 and a message naming what is wrong.
    for (args, says) in [
        (vec!["queue", "show", "999999"], "no work item 999999"),
        (vec!["queue", "cancel", "999999"], "no work item 999999"),
        (
            vec!["queue", "list", "--status", "done"],
            "unknown status 'done'",
        ),
    ] {
        let out = root.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
    let out = root.run(&["queue", "show", "one"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn an_item_that_always_fails_is_set_aside_with_work_failed_and_the_queue_goes_on() {
    // Selfplay of hex6_2p always fails (exit 3); hex8_2p plays. A failed item waits 0.1 s,
    // doubling, and is set aside after its third failure.
    let root = Root::with_config(concat!(
        "http:\n  enabled: false\n",
        "pipeline:\n  config_keys: [hex8_2p, hex6_2p]\n  jobs:\n    selfplay:\n",
        "      command: [\"sh\", \"-c\", \"if [ \\\"$1\\\" = hex6_2p ]; then echo \\\"no board for $1\\\" >&2; exit 3; fi; ",
        "exec \\\"$0\\\" job selfplay --config-key \\\"$1\\\" --games \\\"$2\\\" --db \\\"$3\\\" --seed \\\"$4\\\"\", ",
        "\"{worker}\", \"{config_key}\", \"{games}\", \"{db_path}\", \"{seed}\"]\n",
        "      max_runtime: 60\n",
        "daemons:\n",
        "  queue_populator:\n    interval: 0.5\n    heartbeat_interval: 0.2\n    target_depth: 4\n    games_per_item: 2\n",
        "  selfplay_scheduler:\n    interval: 0.2\n    heartbeat_interval: 0.2\n    slots: 2\n    retry_backoff: 0.1\n",
    ));
    root.ok(&["start", "queue_populator", "selfplay_scheduler"]);
    let failed = || {
        root.events_of("WORK_FAILED")
            .into_iter()
            .find(|e| e.payload["config_key"] == "hex6_2p")
    };
    assert!(
        wait_until(Duration::from_secs(60), || failed().is_some()),
        "no WORK_FAILED:\n{}\n{}",
        root.ok(&["queue", "list"]),
        std::fs::read_to_string(root.log_path("selfplay_scheduler")).unwrap_or_default()
    );
    let e = failed().unwrap();
    assert_eq!(e.source, "selfplay_scheduler");
    assert_eq!(e.payload["attempts"], 3);
    assert_eq!(e.payload["item_type"], "selfplay");
    let error = e.payload["error"].as_str().unwrap();
    assert!(error.contains("exit 3: no board for hex6_2p"), "{e:?}");
    // The item is in the dead-letter state, with its last error; it ran three times.
    let id = e.payload["item_id"].as_i64().unwrap();
    let dead = item(&root, id);
    assert_eq!((dead.status.as_str(), dead.attempts), ("failed", 3));
    assert_eq!(dead.error.as_deref(), Some(error));
    // The queue goes on: hex8_2p items complete.
    assert!(
        wait_until(Duration::from_secs(60), || items(
            &root,
            &["--status", "completed"]
        )
        .iter()
        .any(|i| i.config["config_key"] == "hex8_2p")),
        "{}",
        root.ok(&["queue", "list"])
    );
}
