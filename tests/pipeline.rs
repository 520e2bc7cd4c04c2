//! Issue 6: `start --all` runs the whole self-improvement loop on one machine — selfplay, export,
//! training, evaluation, promotion — observable in events, logs and data files; killing pipeline
//! daemons mid-loop delays it but loses no step.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Generous: the loop takes seconds here, but CI machines are busy.
const LOOP: Duration = Duration::from_secs(240);

/// The default configuration with small numbers, so one loop takes seconds.
fn small_config() -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/unified_loop.yaml"
    ))
    .unwrap();
    // Start from the shipped file (so its pipeline section is what is tested) and override by env below.
    default
}

fn small_env(cmd: &mut std::process::Command) {
    for (k, v) in [
        ("RINGRIFT_HTTP__ADDR", "127.0.0.1:0"),
        ("RINGRIFT_DAEMON_INTERVAL", "1"),
        ("RINGRIFT_DEFAULTS__HEARTBEAT_INTERVAL", "0.5"),
        ("RINGRIFT_DAEMONS__QUEUE_POPULATOR__TARGET_DEPTH", "4"),
        ("RINGRIFT_DAEMONS__QUEUE_POPULATOR__GAMES_PER_ITEM", "100"),
        ("RINGRIFT_DAEMONS__AUTO_EXPORT__THRESHOLD_GAMES", "300"),
        ("RINGRIFT_DAEMONS__AUTO_EXPORT__BATCH_TIMEOUT", "5"),
        ("RINGRIFT_DAEMONS__TRAINING_TRIGGER__MIN_SAMPLES", "1000"),
        ("RINGRIFT_DAEMONS__TRAINING_TRIGGER__COOLDOWN", "0"),
        ("RINGRIFT_DAEMONS__EVALUATION__GAMES", "100"),
        ("RINGRIFT_DAEMONS__AUTO_PROMOTION__MIN_GAMES", "50"),
        ("RINGRIFT_DAEMONS__IDLE_RESOURCE__ENABLED", "false"),
    ] {
        cmd.env(k, v);
    }
}

fn start_all(root: &Root) {
    let mut cmd = root.cmd(&["start", "--all"]);
    small_env(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "start --all: {}{}\n{}",
        stdout(&out),
        stderr(&out),
        root.master_log()
    );
}

fn events(root: &Root) -> Vec<Value> {
    root.ok(&["events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn first(evs: &[Value], t: &str) -> Option<u64> {
    evs.iter()
        .find(|e| e["type"] == t)
        .and_then(|e| e["seq"].as_u64())
}

fn decided(evs: &[Value]) -> Option<&Value> {
    evs.iter()
        .find(|e| e["type"] == "MODEL_PROMOTED" || e["type"] == "PROMOTION_REJECTED")
}

/// Waits for a promotion decision, then checks the loop's steps happened in order for that model.
fn wait_for_loop(root: &Root) -> Vec<Value> {
    let mut evs = Vec::new();
    let done = wait_until(LOOP, || {
        evs = events(root);
        decided(&evs).is_some()
    });
    let kinds: Vec<String> = evs
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert!(
        done,
        "no promotion decision within {LOOP:?}; events: {kinds:?}\nstatus: {}",
        root.ok(&["status"])
    );
    let order = [
        "NEW_GAMES_AVAILABLE",
        "NPZ_EXPORT_COMPLETE",
        "TRAINING_STARTED",
        "TRAINING_COMPLETED",
        "EVALUATION_COMPLETED",
    ];
    let seqs: Vec<u64> = order
        .iter()
        .map(|t| first(&evs, t).unwrap_or_else(|| panic!("no {t} in {kinds:?}")))
        .collect();
    let story = || -> Vec<String> {
        evs.iter()
            .filter(|e| {
                !matches!(
                    e["type"].as_str(),
                    Some(
                        "SELFPLAY_COMPLETE"
                            | "NEW_GAMES_AVAILABLE"
                            | "DAEMON_STARTED"
                            | "QUALITY_SCORE_UPDATED"
                    )
                )
            })
            .map(|e| {
                format!(
                    "{} {} {}",
                    e["seq"],
                    e["type"].as_str().unwrap_or(""),
                    e["payload"]
                )
            })
            .collect()
    };
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {order:?} at {seqs:?}:\n{:#?}",
        story()
    );
    let decision = decided(&evs).unwrap();
    assert!(
        decision["seq"].as_u64().unwrap() > seqs[4],
        "decided after the evaluation:\n{:#?}",
        story()
    );
    if decision["type"] == "PROMOTION_REJECTED" {
        for key in ["gate", "value", "threshold"] {
            assert!(
                decision["payload"].get(key).is_some(),
                "a rejection names its {key}: {decision}"
            );
        }
    }
    evs
}

#[test]
fn start_all_runs_the_whole_loop_and_the_promoted_model_beats_random() {
    let root = Root::with_config(&small_config());
    start_all(&root);
    let evs = wait_for_loop(&root);

    // Games in the DB.
    let db = rusqlite::Connection::open(root.path().join("data/games/hex8_2p.db")).unwrap();
    let games: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM games WHERE status = 'completed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(games >= 300, "{games} games");
    // An NPZ a numpy-compatible reader can read.
    let bytes = std::fs::read(root.path().join("data/training/hex8_2p.npz")).unwrap();
    let arrays = ringrift::game::npz::read_npz(&bytes).expect("a valid NPZ");
    let names: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"states") && names.contains(&"outcomes"),
        "{names:?}"
    );
    if std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let path = root.path().join("data/training/hex8_2p.npz");
        let code = format!(
            "import numpy; d = numpy.load('{}'); assert d['states'].shape[0] == d['outcomes'].shape[0] > 0",
            path.display()
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &code])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "numpy could not read the NPZ: {}",
            stderr(&out)
        );
    }

    // With the default gates the first candidate is promoted (there is no canonical model to beat yet).
    let mut evs = evs;
    assert!(
        wait_until(LOOP, || {
            evs = events(&root);
            first(&evs, "MODEL_PROMOTED").is_some()
        }),
        "no promotion: {:?}",
        evs.iter()
            .filter(|e| e["type"] == "PROMOTION_REJECTED")
            .collect::<Vec<_>>()
    );
    let canonical = root.path().join("models/canonical_hex8_2p.bin");
    assert!(canonical.exists());
    let link = std::fs::read_link(root.path().join("models/ringrift_best_hex8_2p"))
        .expect("the best-model link");
    assert!(
        link.to_string_lossy().ends_with("canonical_hex8_2p.bin"),
        "{link:?}"
    );
    // The test runs its own 200-game gauntlet of the canonical model against random play.
    let out_json = root.path().join("check.json");
    let out = std::process::Command::new(WORKER)
        .args([
            "job",
            "gauntlet",
            "--config-key",
            "hex8_2p",
            "--games",
            "200",
            "--seed",
            "4242",
        ])
        .arg("--candidate")
        .arg(&canonical)
        .arg("--output")
        .arg(&out_json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let result: Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    let rate = result["win_rate_vs_random"].as_f64().unwrap();
    assert!(
        rate >= 0.75,
        "the canonical model won only {rate} of its games against random play"
    );
    assert_eq!(result["games_vs_random"], 200);
}

#[test]
fn killing_pipeline_daemons_mid_loop_delays_it_but_loses_no_step() {
    let root = Root::with_config(&small_config());
    start_all(&root);
    // Kill each stage's daemon right after the event that hands it work.
    let plan = [
        ("NEW_GAMES_AVAILABLE", "auto_export"),
        ("NPZ_EXPORT_COMPLETE", "training_trigger"),
        ("TRAINING_COMPLETED", "evaluation"),
        ("EVALUATION_COMPLETED", "auto_promotion"),
    ];
    for (after, victim) in plan {
        let mut evs = Vec::new();
        let seen = wait_until(LOOP, || {
            evs = events(&root);
            first(&evs, after).is_some()
        });
        if !seen && decided(&evs).is_some() {
            break;
        }
        assert!(seen, "no {after}");
        if let Some(pid) = root.pid(victim) {
            signal(pid, SIGKILL);
        }
    }
    wait_for_loop(&root);
    // Every daemon that was killed came back.
    for (_, victim) in plan {
        root.wait_state(victim, "RUNNING", LOOP);
    }
}
