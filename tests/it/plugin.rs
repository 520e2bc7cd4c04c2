//! Issue 14, item 5: the README's plug-in contract, followed literally by small Python programs
//! (tests/fixtures/plugin/, standard library only: sqlite3, zipfile, a few lines of `.npy`),
//! runs the whole loop on a config key the built-in game does not play; and
//! `pipeline reset-backoff KEY`.

use std::time::Duration;

use crate::common::*;

const LOOP: Duration = Duration::from_secs(120);

/// Every job of the loop is one of the Python programs, each given only placeholders the README
/// lists for its kind.
fn plugin_config() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/plugin");
    format!(
        r#"pipeline:
  config_keys: [square8_2p]
  jobs:
    selfplay:
      command: [python3, "{dir}/selfplay.py", --db, "{{db_path}}", --config-key, "{{config_key}}",
                --board, "{{board_type}}", --players, "{{num_players}}", --games, "{{games}}",
                --seed, "{{seed}}"]
    export:
      command: [python3, "{dir}/export.py", --db, "{{db_path}}", --config-key, "{{config_key}}",
                --board, "{{board_type}}", --out, "{{npz_path}}"]
    train:
      command: [python3, "{dir}/train.py", --data, "{{npz_path}}", --init, "{{model_path}}",
                --out, "{{candidate_path}}", --epochs, "{{epochs}}", --lr, "{{learning_rate}}",
                --root, "{{root}}"]
      stuck_after: 1h
    gauntlet:
      command: [python3, "{dir}/gauntlet.py", --candidate, "{{candidate_path}}",
                --baseline, "{{model_path}}", --games, "{{games}}", --sprt, "{{sprt}}",
                --out, "{{output_path}}"]
    validate:
      command: [python3, "{dir}/validate.py", "{{candidate_path}}", "{{config_key}}"]
"#
    )
}

#[test]
fn python_programs_following_the_readme_contract_run_the_loop_to_a_promotion() {
    let root = Root::with_config(&plugin_config());
    root.ok(&["config", "check"]);
    root.ok_with_env(&["start", "--all"], crate::pipeline::SMALL_ENV);
    let mut evs = Vec::new();
    let promoted = wait_until(LOOP, || {
        evs = root.events(&[]);
        evs.iter().any(|e| e.event_type == "MODEL_PROMOTED")
    });
    let story: Vec<String> = evs
        .iter()
        .filter(|e| {
            !matches!(
                e.event_type.as_str(),
                "SELFPLAY_COMPLETE" | "NEW_GAMES_AVAILABLE" | "DAEMON_STARTED"
            )
        })
        .map(|e| format!("{} {}", e.event_type, e.payload))
        .collect();
    assert!(
        promoted,
        "no promotion within {LOOP:?}:\n{story:#?}\n{}",
        root.ok(&["status"])
    );

    // The first candidate was broken on purpose: the validate job refused it before any game.
    let refused = evs
        .iter()
        .find(|e| e.event_type == "EVALUATION_FAILED")
        .unwrap_or_else(|| panic!("the broken candidate was not refused:\n{story:#?}"));
    let error = refused.payload["error"].as_str().unwrap();
    assert!(
        error.contains("the validate job") && error.contains("quarantined"),
        "{error}"
    );
    let log = std::fs::read_dir(root.path().join("logs/jobs"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .find(|t| t.contains("is not an RRPLUGIN model"));
    assert!(log.is_some(), "the validator's reason is in its job log");

    // The canonical model is the Python trainer's, in its own format.
    let canonical = std::fs::read(root.path().join("models/canonical_square8_2p.bin")).unwrap();
    let text = String::from_utf8(canonical).unwrap();
    assert!(text.starts_with("RRPLUGIN-MODEL 1\n"), "{text}");
    assert!(text.contains("\"trainer\": \"plugin-train.py\""), "{text}");
    assert!(text.contains("\"config_key\": \"square8_2p\""), "{text}");

    // The export in place is the Python one: deflated members, with config_key.
    let npz = root.path().join("data/training/square8_2p.npz");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
             print(sorted((i.filename, i.compress_type) for i in z.infolist()))",
        ])
        .arg(&npz)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "[('config_key.npy', 8), ('game_ids.npy', 8), ('outcomes.npy', 8), ('states.npy', 8)]"
    );
    // Two training runs: the broken candidate, then the one promoted.
    let train_ok = evs
        .iter()
        .filter(|e| e.event_type == "TRAINING_COMPLETED")
        .count();
    assert!(train_ok >= 2, "{story:#?}");
}

#[test]
fn reset_backoff_names_what_it_forgets_and_refuses_unknown_keys() {
    let root = Root::new();
    let coord = root.path().join("data/coordination");
    std::fs::create_dir_all(&coord).unwrap();
    std::fs::write(
        coord.join("training_trigger.json"),
        r#"{"keys": {"hex8_2p": {"last_trained": null, "last_training_at": null, "failures": 9,
            "last_failure_at": 1.0, "quality_low": null, "in_flight": null, "trainings": 0}}}"#,
    )
    .unwrap();

    let out = root.run(&["pipeline", "reset-backoff", "hex8_3p"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(
            "unknown config key 'hex8_3p': pipeline.config_keys has hex8_2p (did you mean hex8_2p?)"
        ),
        "{}",
        stderr(&out)
    );
    assert!(
        !root
            .path()
            .join("data/coordination/backoff_resets.json")
            .exists()
    );

    let text = root.ok(&["pipeline", "reset-backoff", "hex8_2p"]);
    assert!(
        text.contains("hex8_2p: training: 9 failed run(s) in a row"),
        "{text}"
    );
    assert!(text.contains("hex8_2p: export: not failing"), "{text}");
    assert!(text.contains("no supervisor runs"), "{text}");
    let resets: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.path().join("data/coordination/backoff_resets.json")).unwrap(),
    )
    .unwrap();
    assert!(resets["hex8_2p"].as_f64().unwrap() > 1.0, "{resets}");
}
