//! Issue 10, "logs keep lines whole" and "what users see is true": long lines, a removed logs/
//! directory, daemons removed by reload, an HTTP port already taken, and `watch` on a small
//! terminal, each with the real binaries.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_long_line_is_one_record_and_its_marked_continuations() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  long:\n    command: [\"sh\", \"-c\", \"head -c 100000 /dev/zero | tr '\\\\0' B; echo; echo done; exec sleep 100\"]\n",
    );
    root.ok(&["start", "long"]);
    let text = root.wait_log("long", "[out] done", T);
    let records: Vec<&str> = text.lines().collect();
    assert_eq!(records.len(), 3, "a record, its continuation, and `done`");
    // `<24-char timestamp> [out] ` then the first 64 KiB; `[out+] ` marks the rest of that line.
    let first = records[0][24..]
        .strip_prefix(" [out] ")
        .expect("a first record");
    let rest = records[1][24..]
        .strip_prefix(" [out+] ")
        .expect("a marked continuation");
    let line = format!("{first}{rest}");
    assert_eq!(line.len(), 100_000);
    assert!(line.bytes().all(|b| b == b'B'));
}

#[test]
fn logs_removed_at_run_time_are_created_again() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  talker:\n    command: [\"sh\", \"-c\", \"echo before; while [ ! -e go ]; do sleep 0.05; done; echo after; exec sleep 100\"]\n",
    );
    root.ok(&["start", "talker"]);
    root.wait_log("talker", "before", T);
    std::fs::remove_dir_all(root.path().join("logs")).unwrap();
    std::fs::write(root.path().join("go"), "").unwrap();
    // logs/talker.log is created again.
    root.wait_log("talker", "[out] after", T);
    // The supervisor's own log comes back with its next line.
    root.ok(&["stop", "talker"]);
    assert!(
        wait_until(T, || root.master_log().contains("talker")),
        "logs/master_loop.log was not created again"
    );
}

#[test]
fn status_forgets_daemons_that_reload_removed() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  keep:\n    command: [\"sleep\", \"1000\"]\n  drop_me:\n    command: [\"sleep\", \"1000\"]\n",
    );
    root.ok(&["start", "keep", "drop_me"]);
    root.wait_state("drop_me", DaemonState::Running, T);
    root.write_config(
        "http:\n  enabled: false\ndaemons:\n  keep:\n    command: [\"sleep\", \"1000\"]\n",
    );
    root.ok(&["reload"]);
    let listed = |root: &Root| root.status().daemons.iter().any(|d| d.name == "drop_me");
    assert!(
        wait_until(T, || !listed(&root)),
        "status still lists drop_me:\n{}",
        root.master_log()
    );
    let table = root.ok(&["status"]);
    assert!(!table.contains("drop_me"), "{table}");
    let one = root.run(&["status", "drop_me"]);
    assert_eq!(one.status.code(), Some(2), "{one:?}");
    assert!(stderr(&one).contains("unknown daemon"), "{}", stderr(&one));
    assert_eq!(root.state("keep"), DaemonState::Running);
}

#[test]
fn start_and_status_say_when_http_could_not_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let root = Root::with_config(&format!(
        "http:\n  addr: {addr}\ndaemons:\n  idle:\n    command: [\"sleep\", \"1000\"]\n"
    ));
    let out = root.run(&["start", "idle"]);
    assert!(out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "warning: HTTP monitoring is off: cannot listen on {addr}"
        )),
        "start gave no warning:\n{err}"
    );
    let sup = root.status().supervisor;
    let why = sup.http_error.as_deref().unwrap_or_default();
    assert!(why.contains(&addr.to_string()), "{sup:#?}");
    assert_eq!(sup.http, None);
    let table = root.ok(&["status"]);
    assert!(table.contains("warning: HTTP monitoring is off"), "{table}");
    drop(taken);
}

#[test]
fn watch_fits_80_columns_and_survives_multi_byte_payloads() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  a_daemon_with_a_long_name:\n    command: [\"sleep\", \"1000\"]\n",
    );
    root.ok(&["start", "a_daemon_with_a_long_name"]);
    // Characters of 2, 3 and 4 bytes straddling every cut-off, and a newline that would break
    // the screen.
    for pad in 0..4 {
        let error = format!("{}{}", "x".repeat(pad), "é€😀\n".repeat(40));
        let payload = serde_json::json!({ "error": error }).to_string();
        root.ok(&["emit", "DATA_SYNC_FAILED", &payload]);
    }
    let out = root
        .cmd(&["watch", "--once"])
        .env("COLUMNS", "80")
        .env("LINES", "24")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let frame = stdout(&out);
    let lines: Vec<&str> = frame.lines().collect();
    assert!(lines.len() <= 24, "{} rows:\n{frame}", lines.len());
    for l in &lines {
        assert!(l.chars().count() <= 80, "wider than 80: {l:?}");
    }
    assert!(frame.contains("DATA_SYNC_FAILED"), "{frame}");
    assert!(frame.contains("a_daemon_with_a_long_name"), "{frame}");
}

#[test]
fn a_removed_daemon_can_still_be_named_while_it_shuts_down() {
    let stubborn = "  stubborn:\n    command: [\"sh\", \"-c\", \"trap '' TERM; exec sleep 1000\"]\n    grace_period: 60\n";
    let root = Root::with_config(&format!(
        "http:\n  enabled: false\ndaemons:\n  keep:\n    command: [\"sleep\", \"1000\"]\n{stubborn}"
    ));
    root.ok(&["start", "keep", "stubborn"]);
    root.wait_state("stubborn", DaemonState::Running, T);
    root.write_config(
        "http:\n  enabled: false\ndaemons:\n  keep:\n    command: [\"sleep\", \"1000\"]\n",
    );
    root.ok(&["reload"]);
    // It ignores SIGTERM: listed, SHUTTING_DOWN, for its 60 s grace period ...
    let one = parse_status(&root.ok(&["status", "stubborn", "--json"]));
    assert_eq!(one.daemons[0].state, DaemonState::ShuttingDown, "{one:#?}");
    // ... unless cut short by name.
    let out = root.ok(&["stop", "--force", "stubborn"]);
    assert!(out.contains("STOPPED"), "{out}");
    assert!(wait_until(T, || {
        root.run(&["status", "stubborn"]).status.code() == Some(2)
    }));
    assert_eq!(root.state("keep"), DaemonState::Running);
}
