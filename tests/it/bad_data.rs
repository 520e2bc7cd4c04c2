//! Issue 10, point 9: bad data never stalls the loop. A games DB that is garbage is moved aside,
//! announced (GAMES_DB_QUARANTINED) and shown in health while selfplay goes on into a fresh one;
//! a game row with an impossible winner is skipped and counted by export while training goes on;
//! a step that keeps failing is retried with growing delays, and training says why no data comes.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const KEY: &str = "hex8_2p";
const WITHIN: Duration = Duration::from_secs(120);

/// Small numbers so each step takes seconds; `extra` overrides on top.
fn start(root: &Root, daemons: &[&str], extra: &[(&str, &str)]) {
    let mut args = vec!["start"];
    args.extend_from_slice(daemons);
    let mut env = vec![
        ("RINGRIFT_HTTP__ADDR", "127.0.0.1:0"),
        ("RINGRIFT_DAEMON_INTERVAL", "1"),
        ("RINGRIFT_DEFAULTS__HEARTBEAT_INTERVAL", "0.5"),
        ("RINGRIFT_DAEMONS__QUEUE_POPULATOR__TARGET_DEPTH", "2"),
        ("RINGRIFT_DAEMONS__QUEUE_POPULATOR__GAMES_PER_ITEM", "20"),
        ("RINGRIFT_DAEMONS__AUTO_EXPORT__THRESHOLD_GAMES", "10"),
        ("RINGRIFT_DAEMONS__AUTO_EXPORT__BATCH_TIMEOUT", "0"),
        ("RINGRIFT_DAEMONS__TRAINING_TRIGGER__MIN_SAMPLES", "100"),
        ("RINGRIFT_DAEMONS__TRAINING_TRIGGER__COOLDOWN", "0"),
    ];
    env.extend_from_slice(extra);
    root.ok_with_env(&args, &env);
}

fn wait_events(root: &Root, kind: &str, n: usize, what: &str) -> Vec<Event> {
    let mut evs = Vec::new();
    let ok = wait_until(WITHIN, || {
        evs = root.events_of(kind);
        evs.len() >= n
    });
    assert!(
        ok,
        "{what}: {} {kind} event(s), wanted {n}\nstatus: {}",
        evs.len(),
        root.ok(&["status"])
    );
    evs
}

/// Waits until `daemon`'s health satisfies `good`.
fn wait_health(root: &Root, daemon: &str, good: impl Fn(&Health) -> bool) -> Health {
    root.wait_health(daemon, WITHIN, good)
}

/// Waits for a NEW_GAMES_AVAILABLE event after the one numbered `seq`.
fn wait_games_after(root: &Root, seq: u64, what: &str) {
    let found = wait_until(WITHIN, || {
        root.events_of("NEW_GAMES_AVAILABLE")
            .iter()
            .any(|e| e.seq > seq)
    });
    assert!(found, "{what}\nstatus: {}", root.ok(&["status"]));
}

/// Plays `games` games into the key's DB with the built-in selfplay job.
fn selfplay(root: &Root, games: u32) {
    let out = std::process::Command::new(WORKER)
        .args(["job", "selfplay", "--config-key", KEY, "--seed", "5"])
        .args(["--games", &games.to_string(), "--db"])
        .arg(db_path(root))
        .env_remove("RINGRIFT_SUPERVISOR_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "selfplay: {}", stderr(&out));
}

fn db_path(root: &Root) -> std::path::PathBuf {
    root.path().join(format!("data/games/{KEY}.db"))
}

fn completed_games(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM games WHERE status = 'completed'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// Checks one GAMES_DB_QUARANTINED payload and returns where the DB went, which must hold
/// `garbage` byte for byte.
fn check_quarantine(root: &Root, event: &Event, garbage: &[u8]) -> String {
    let p = &event.payload;
    assert_eq!(p["config_key"], KEY, "{event:?}");
    assert_eq!(event.source, "selfplay_scheduler", "{event:?}");
    assert_eq!(
        p["db_path"].as_str().unwrap(),
        db_path(root).display().to_string()
    );
    let moved = p["moved_to"].as_str().unwrap().to_string();
    let suffix = moved
        .strip_prefix(&format!("{}.bad-", db_path(root).display()))
        .unwrap_or_else(|| panic!("moved to {moved}"));
    assert!(
        suffix.split('-').all(|part| part.parse::<u64>().is_ok()),
        "<name>.bad-<unix secs>[-n]: {moved}"
    );
    assert!(
        p["error"].as_str().unwrap().contains("not a database"),
        "the reason: {event:?}"
    );
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        garbage,
        "moved byte for byte"
    );
    moved
}

#[test]
fn a_garbage_games_db_is_moved_aside_reported_and_selfplay_goes_on_in_a_fresh_one() {
    let root = Root::new();
    let db = db_path(&root);
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let garbage = vec![b'Z'; 8192];
    std::fs::write(&db, &garbage).unwrap();
    start(&root, &["queue_populator", "selfplay_scheduler"], &[]);

    // Before the first job: moved aside, announced with the reason, selfplay fills a fresh DB.
    let q = wait_events(&root, "GAMES_DB_QUARANTINED", 1, "garbage before start");
    let first = check_quarantine(&root, &q[0], &garbage);
    let quarantined_at = q[0].seq;
    wait_games_after(&root, quarantined_at, "no games after the quarantine");
    assert!(completed_games(&db) > 0);
    let h = wait_health(&root, "selfplay_scheduler", |h| {
        h.detail("quarantined")[0]["moved_to"] == first.as_str()
    });
    assert!(
        h.message
            .contains(&format!("quarantined games db {}", db.display())),
        "{h:#?}"
    );

    // Again while the loop runs (queue_populator keeps queueing): the scheduler is restarted
    // around the damage so that no job is writing at that moment.
    root.ok(&["stop", "selfplay_scheduler"]);
    assert!(
        wait_until(WITHIN, || root.status().jobs.is_empty()),
        "jobs still running"
    );
    let garbage2 = b"this is not sqlite either ".repeat(400);
    std::fs::write(&db, &garbage2).unwrap();
    start(&root, &["selfplay_scheduler"], &[]);
    let q = wait_events(&root, "GAMES_DB_QUARANTINED", 2, "garbage while running");
    let second = check_quarantine(&root, &q[1], &garbage2);
    assert_ne!(first, second, "an earlier quarantine is never overwritten");
    assert_eq!(std::fs::read(&first).unwrap(), garbage);
    let again = q[1].seq;
    wait_games_after(&root, again, "no games after the second quarantine");
    assert!(completed_games(&db) > 0);
    wait_health(&root, "selfplay_scheduler", |h| {
        h.detail("quarantined")[0]["moved_to"] == second.as_str()
    });
}

#[test]
fn a_game_row_with_an_impossible_winner_is_skipped_counted_and_training_goes_on() {
    let root = Root::new();
    selfplay(&root, 40);
    let conn = rusqlite::Connection::open(db_path(&root)).unwrap();
    conn.execute_batch(
        "INSERT INTO games (config_key, board_type, num_players, created_at, completed_at, status,
                            winner, total_moves, source)
         SELECT config_key, board_type, num_players, created_at, completed_at, status, 7,
                total_moves, 'test' FROM games WHERE id = 1;
         INSERT INTO moves (game_id, move_number, player, cell)
         SELECT 41, move_number, player, cell FROM moves WHERE game_id = 1;",
    )
    .unwrap();
    drop(conn);
    start(&root, &["training_trigger"], &[]);

    let done = wait_events(&root, "NPZ_EXPORT_COMPLETE", 1, "export");
    let p = &done[0].payload;
    assert_eq!(p["skipped_rows"], 1, "{p}");
    assert_eq!(p["games"], 40, "{p}");
    assert_eq!(p["last_game_id"], 41, "the skipped row counts as read: {p}");
    let h = wait_health(&root, "auto_export", |h| {
        h.detail("keys")[KEY]["last_skipped_rows"] == 1
    });
    assert!(h.healthy, "{h:#?}");
    assert!(h.message.contains("skipped 1 game row(s)"), "{h:#?}");
    assert_eq!(
        root.daemon("auto_export").progress.get("rows_skipped"),
        Some(&1)
    );
    // The job's log names the row and why.
    let logs = std::fs::read_dir(root.path().join("logs/jobs")).unwrap();
    let named = logs.filter_map(Result::ok).any(|f| {
        std::fs::read_to_string(f.path())
            .unwrap_or_default()
            .contains("skipped game 41 in")
            && std::fs::read_to_string(f.path())
                .unwrap_or_default()
                .contains("winner 7 is not a player of this 2-player game")
    });
    assert!(named, "the export job's log names the skipped row");

    // Training goes on with the export.
    let trained = wait_events(&root, "TRAINING_COMPLETED", 1, "training");
    assert_eq!(trained[0].payload["config_key"], KEY);
    assert!(root.events_of("TRAINING_FAILED").is_empty());
}

/// The shipped configuration with the `kind` job's command replaced by `sh -c <script>`.
fn with_job_command(kind: &str, script: &str) -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/unified_loop.yaml"
    ))
    .unwrap();
    let broken = format!(r#"command: ["sh", "-c", "{script}"]"#);
    let header = format!("{kind}:");
    let lines: Vec<String> = default
        .lines()
        .scan(false, |in_job, line| {
            let out = if *in_job && line.trim_start().starts_with("command:") {
                *in_job = false;
                format!("      {broken}")
            } else {
                line.to_string()
            };
            if line.trim() == header {
                *in_job = true;
            }
            Some(out)
        })
        .collect();
    let config = lines.join("\n");
    assert!(config.contains(&broken), "the {kind} command was replaced");
    config
}

/// Seconds of the day of an RFC 3339 UTC timestamp (`2026-11-29T10:15:11.123Z`).
fn day_secs(ts: &str) -> f64 {
    let time = ts.split('T').nth(1).unwrap().trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[test]
fn a_failing_export_is_retried_with_growing_delays_and_training_says_why_no_data_comes() {
    let config = with_job_command("export", "echo export is broken >&2; exit 1");
    let root = Root::with_config(&config);
    selfplay(&root, 20);
    start(&root, &["training_trigger"], &[]);

    // Events keep asking for exports; they must not bypass the backoff.
    let first = wait_events(&root, "NPZ_EXPORT_STARTED", 1, "first attempt");
    let t0 = day_secs(&first[0].timestamp);
    // Until the third attempt, an event every 250 ms (about 40 of them before it is due).
    let mut last_emit: Option<std::time::Instant> = None;
    let mut attempts: Vec<f64> = Vec::new();
    let third = wait_until(Duration::from_secs(40), || {
        if last_emit.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
            root.ok(&[
                "emit",
                "NEW_GAMES_AVAILABLE",
                r#"{"config_key": "hex8_2p", "new_games": 5}"#,
            ]);
            last_emit = Some(std::time::Instant::now());
        }
        attempts = root
            .events_of("NPZ_EXPORT_STARTED")
            .iter()
            .map(|e| {
                let t = day_secs(&e.timestamp) - t0;
                if t < -43_200.0 { t + 86_400.0 } else { t }
            })
            .collect();
        attempts.len() >= 3
    });
    assert!(third, "no third attempt: {attempts:?}");
    // Attempts at about 0, 2, 6 (+ up to 25 % jitter each), whatever the events asked: never 25
    // in 10 s.
    let gaps: Vec<f64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 1.5, "first retry after about 2 s: {gaps:?}");
    assert!(gaps[1] > gaps[0] * 1.4, "the delay grows: {gaps:?}");

    // The job's own words come from its log, which may trail its exit by a moment: any later
    // attempt will do.
    let h = wait_health(&root, "auto_export", |h| {
        h.detail("keys")[KEY]["failing"]["attempts"].as_u64() >= Some(2)
            && h.message.contains("export is broken")
    });
    let message = &h.message;
    assert!(!h.healthy, "{h:#?}");
    assert!(
        message.contains("retrying in ") && message.contains(" s after: export job"),
        "{message}"
    );
    assert!(
        message.contains("export is broken"),
        "the job's own words: {message}"
    );
    let failing = &h.detail("keys")[KEY]["failing"];
    assert!(failing["attempts"].as_u64().unwrap() >= 2, "{h:#?}");

    let t = wait_health(&root, "training_trigger", |t| {
        t.status == "waiting_for_data"
    });
    let message = &t.message;
    assert!(!message.contains("up to date"), "{message}");
    assert!(
        message.contains("no new data: auto_export is failing, retrying"),
        "{message}"
    );
    assert_eq!(t.status, "waiting_for_data", "{t:#?}");
    assert_eq!(t.detail("export_failing")[0], KEY, "{t:#?}");
}

#[test]
fn failing_selfplay_jobs_are_retried_with_growing_delays_not_every_cycle() {
    let root = Root::with_config(&with_job_command(
        "selfplay",
        "echo selfplay is broken >&2; exit 1",
    ));
    start(&root, &["queue_populator", "selfplay_scheduler"], &[]);
    let jobs = root.path().join("logs/jobs");
    let count = || {
        std::fs::read_dir(&jobs).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|f| {
                    f.file_name()
                        .to_string_lossy()
                        .starts_with("selfplay_scheduler-")
                })
                .count()
        })
    };
    // When each job began: the modification time of its log's directory entry is its last line,
    // so take the first line's timestamp instead.
    let started = |n: usize| -> Vec<f64> {
        let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(&jobs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|f| f.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|f| f.to_string_lossy().starts_with("selfplay_scheduler-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .take(n)
            .filter_map(|p| {
                let text = std::fs::read_to_string(p).ok()?;
                Some(day_secs(text.lines().next()?.split_whitespace().next()?))
            })
            .collect()
    };
    // With a 1 s interval a job every cycle would be three within 2 s; with the backoff the third
    // comes after about 2 + 4 s.
    let mut times = Vec::new();
    assert!(
        wait_until(Duration::from_secs(40), || {
            times = started(3);
            count() >= 3 && times.len() >= 3
        }),
        "no third selfplay job: {times:?}"
    );
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 1.5, "first retry after about 2 s: {gaps:?}");
    assert!(gaps[1] > gaps[0] * 1.4, "the delay grows: {gaps:?}");
    let h = wait_health(&root, "selfplay_scheduler", |h| {
        h.message.contains("selfplay retrying in ")
    });
    assert!(!h.healthy, "{h:#?}");
    assert!(h.message.contains(" s after: work item"), "{h:#?}");
}
