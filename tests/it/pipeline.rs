//! Issue 6: `start --all` runs the whole self-improvement loop on one machine — selfplay, export,
//! training, evaluation, promotion — observable in events, logs and data files; killing pipeline
//! daemons mid-loop delays it but loses no step.

use std::time::Duration;

use crate::common::*;
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

/// Small numbers for the loop, as environment overrides.
pub(crate) const SMALL_ENV: &[(&str, &str)] = &[
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
];

fn start_all(root: &Root) {
    root.ok_with_env(&["start", "--all"], SMALL_ENV);
}

fn events(root: &Root) -> Vec<Event> {
    root.events(&[])
}

fn first(evs: &[Event], t: &str) -> Option<u64> {
    evs.iter().find(|e| e.event_type == t).map(|e| e.seq)
}

fn decided(evs: &[Event]) -> Option<&Event> {
    evs.iter()
        .find(|e| e.event_type == "MODEL_PROMOTED" || e.event_type == "PROMOTION_REJECTED")
}

/// Waits for a promotion decision, then checks the loop's steps happened in order for that model.
fn wait_for_loop(root: &Root) -> Vec<Event> {
    let mut evs = Vec::new();
    let done = wait_until(LOOP, || {
        evs = events(root);
        decided(&evs).is_some()
    });
    let kinds: Vec<&str> = evs.iter().map(|e| e.event_type.as_str()).collect();
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
                    e.event_type.as_str(),
                    "SELFPLAY_COMPLETE"
                        | "NEW_GAMES_AVAILABLE"
                        | "DAEMON_STARTED"
                        | "QUALITY_SCORE_UPDATED"
                )
            })
            .map(|e| format!("{} {} {}", e.seq, e.event_type, e.payload))
            .collect()
    };
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {order:?} at {seqs:?}:\n{:#?}",
        story()
    );
    let decision = decided(&evs).unwrap();
    assert!(
        decision.seq > seqs[4],
        "decided after the evaluation:\n{:#?}",
        story()
    );
    if decision.event_type == "PROMOTION_REJECTED" {
        for key in ["gate", "value", "threshold"] {
            assert!(
                decision.payload.get(key).is_some(),
                "a rejection names its {key}: {decision:?}"
            );
        }
    }
    evs
}

/// The first promotion is recorded in data/ratings.db with the candidate, its evaluation and the
/// ratings behind it; the ladder rates the promoted model above random play (0 Elo), and it is
/// pinned as generation 1, a reference opponent of later gauntlets.
fn check_ratings_and_promotion_record(root: &Root, evs: &[Event], canonical: &std::path::Path) {
    let promoted = evs
        .iter()
        .find(|e| e.event_type == "MODEL_PROMOTED")
        .unwrap();
    assert_eq!(promoted.payload["generation"], 1, "{promoted:?}");
    let rating = promoted.payload["rating_elo"].as_f64().unwrap();
    let db = rusqlite::Connection::open(root.path().join("data/ratings.db")).unwrap();
    let (generation, candidate, sha, evaluation, ratings, elo): (
        i64,
        String,
        String,
        String,
        String,
        f64,
    ) = db
        .query_row(
            "SELECT generation, candidate, sha256, evaluation, ratings, rating_elo
             FROM promotions WHERE config_key = 'hex8_2p' ORDER BY generation LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(generation, 1);
    assert!(
        candidate.contains("models/candidates/hex8_2p/"),
        "{candidate}"
    );
    let bytes = std::fs::read(canonical).unwrap();
    let file = std::process::Command::new("sha256sum")
        .arg(canonical)
        .output()
        .unwrap();
    assert!(
        stdout(&file).starts_with(&sha),
        "{sha} is the canonical model's SHA-256"
    );
    assert!(!bytes.is_empty());
    let evaluation: Value = serde_json::from_str(&evaluation).unwrap();
    assert!(
        evaluation["games_vs_heuristic"].as_u64().unwrap() > 0,
        "{evaluation}"
    );
    assert_eq!(evaluation["model_sha256"], sha.as_str());
    let ratings: Value = serde_json::from_str(&ratings).unwrap();
    assert_eq!(ratings["random"]["elo"], 0.0, "{ratings}");
    assert!(ratings["heuristic"]["elo"].as_f64().is_some(), "{ratings}");
    assert_eq!(ratings[&sha]["elo"].as_f64().unwrap(), elo);
    assert!((elo - rating).abs() < 1e-9 && elo > 100.0, "{ratings}");
    let matches: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM matches WHERE player = ?1",
            [&sha],
            |r| r.get(0),
        )
        .unwrap();
    assert!(matches >= 2, "against random and the heuristic: {matches}");
    let pinned = root.path().join("models/reference/hex8_2p/gen-1.bin");
    assert_eq!(
        std::fs::read(pinned).unwrap(),
        bytes,
        "generation 1 is pinned"
    );
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
    // An NPZ another reader can read: a zip of `.npy` arrays (Python's own zipfile), and numpy
    // itself where it is installed.
    let npz = root.path().join("data/training/hex8_2p.npz");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; print(' '.join(sorted(zipfile.ZipFile(sys.argv[1]).namelist())))",
        ])
        .arg(&npz)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let names = stdout(&out);
    assert!(
        names.contains("states.npy") && names.contains("outcomes.npy"),
        "{names}"
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
            .filter(|e| e.event_type == "PROMOTION_REJECTED")
            .collect::<Vec<_>>()
    );
    let canonical = root.path().join("models/canonical_hex8_2p.bin");
    assert!(canonical.exists());
    check_ratings_and_promotion_record(&root, &evs, &canonical);
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
        root.wait_state(victim, DaemonState::Running, LOOP);
    }
}

/// Issue 9: nobody outside a step can announce its result, and daemons never act on a fact they
/// can check themselves. The forged events are first refused to the CLI (only `evaluation` may
/// announce an evaluation); then an `evaluation` daemon that lies sends them, and auto_promotion's
/// own checks (confined paths, its own results files, the model's hash) refuse each with a reason.
#[test]
fn forged_events_never_promote_a_model_nor_touch_the_canonical_one() {
    const KEY: &str = "hex8_2p";
    let root = Root::with_config(&small_config());
    // One training run only, so the canonical model changes only if a forged event gets through.
    let mut env = SMALL_ENV.to_vec();
    env.push(("RINGRIFT_DAEMONS__TRAINING_TRIGGER__COOLDOWN", "3600"));
    root.ok_with_env(&["start", "--all"], &env);
    let mut evs = Vec::new();
    assert!(
        wait_until(LOOP, || {
            evs = events(&root);
            first(&evs, "MODEL_PROMOTED").is_some()
        }),
        "no first promotion: {:?}",
        evs.iter().map(|e| &e.event_type).collect::<Vec<_>>()
    );
    let canonical = root.path().join(format!("models/canonical_{KEY}.bin"));
    let before = std::fs::read(&canonical).unwrap();
    let candidates = root.path().join(format!("models/candidates/{KEY}"));
    let evaluated: Vec<Value> = std::fs::read_dir(&candidates)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".eval.json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    assert!(
        evaluated.iter().all(|r| r["model_sha256"].is_string()),
        "evaluation records the model's hash: {evaluated:?}"
    );

    let payload = |model_path: &std::path::Path, numbers: &str| {
        format!(
            r#"{{"config_key":"{KEY}","model_path":{}{numbers}}}"#,
            serde_json::to_string(&model_path.display().to_string()).unwrap()
        )
    };
    let perfect = r#","win_rate_vs_random":1,"win_rate_vs_baseline":1,"games":1000"#;
    // The forged events, delivered by whoever the test makes their emitter. The CLI and HTTP may
    // not emit a step's result at all; the daemons' own checks are shown below by an `evaluation`
    // daemon that lies.
    let mut forged: Vec<String> = Vec::new();
    let mut forge = |event_type: &str, model_path: &std::path::Path, numbers: &str| {
        let text = payload(model_path, numbers);
        let out = root.run(&["emit", event_type, &text]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "the CLI may not emit {event_type}"
        );
        assert!(
            stderr(&out).contains(&format!("cli may not emit {event_type}")),
            "{}",
            stderr(&out)
        );
        if event_type == "EVALUATION_COMPLETED" {
            forged.push(text);
        }
    };

    // 1. A loadable model outside the root.
    let outside = tempfile::tempdir().unwrap();
    let foreign = outside.path().join(KEY).join("evil.bin");
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(&foreign, &before).unwrap();
    forge("EVALUATION_COMPLETED", &foreign, perfect);
    // 2. A symlink named like a candidate, leading to a secret outside (standing in for /etc/shadow).
    let shadow = outside.path().join("shadow");
    std::fs::write(&shadow, b"root:$6$secret:19000:0:99999:7:::\n").unwrap();
    let link = candidates.join("evil.bin");
    std::os::unix::fs::symlink(&shadow, &link).unwrap();
    forge("EVALUATION_COMPLETED", &link, perfect);
    // 3. A real candidate (a different, loadable model) whose own results fail the gates, and an
    //    event that claims better numbers.
    let trained = outside.path().join("other.bin");
    let npz = root.path().join(format!("data/training/{KEY}.npz"));
    let out = std::process::Command::new(WORKER)
        .args(["job", "train", "--config-key", KEY, "--epochs", "1"])
        .arg("--input")
        .arg(&npz)
        .arg("--output")
        .arg(&trained)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let sum = std::process::Command::new("sha256sum")
        .arg(&trained)
        .output()
        .unwrap();
    let sha = stdout(&sum).split_whitespace().next().unwrap().to_string();
    let weak = candidates.join(format!("{KEY}-1.bin"));
    let results = serde_json::json!({
        "win_rate_vs_random": 0.1, "win_rate_vs_baseline": 0.1, "games_vs_random": 100,
        "model_path": weak.display().to_string(), "model_sha256": sha,
    });
    // Results first, then the candidate (by rename): evaluation never sees it unevaluated.
    std::fs::write(weak.with_extension("eval.json"), results.to_string()).unwrap();
    let staged = candidates.join(".weak.tmp");
    std::fs::copy(&trained, &staged).unwrap();
    std::fs::rename(&staged, &weak).unwrap();
    forge("EVALUATION_COMPLETED", &weak, perfect);
    // 4. A "trained candidate" outside the candidates directory (evaluation's check of it is a
    //    unit test: with a lying evaluation daemon below, nothing real evaluates).
    forge("TRAINING_COMPLETED", &foreign, "");

    // Now the same facts from the one daemon allowed to state them: `evaluation` becomes a program
    // that emits the forged results (a user's evaluator that is wrong, or compromised).
    let mut config = small_config();
    let mut lying = format!(
        "    command: [{}, \"fault\", \"--emit\", \"EVALUATION_COMPLETED\", \"--emit-count\", \"{}\"",
        serde_json::to_string(WORKER).unwrap(),
        forged.len()
    );
    for p in &forged {
        lying.push_str(&format!(
            ", \"--emit-payload\", {}",
            serde_json::to_string(p).unwrap()
        ));
    }
    lying.push_str("]\n    protocol: true\n");
    let at =
        config.find("\n  evaluation:\n").expect("evaluation entry") + "\n  evaluation:\n".len();
    config.insert_str(at, &lying);
    root.write_config(&config);
    root.ok(&["reload"]);

    let rejected = |evs: &[Event], path: &std::path::Path, gate: &str| -> Option<Value> {
        evs.iter()
            .find(|e| {
                e.event_type == "PROMOTION_REJECTED"
                    && e.payload["model_path"] == path.display().to_string().as_str()
                    && e.payload["gate"] == gate
            })
            .map(|e| e.payload.clone())
    };
    let done = wait_until(Duration::from_secs(60), || {
        evs = events(&root);
        rejected(&evs, &foreign, "provenance").is_some()
            && rejected(&evs, &link, "provenance").is_some()
            && rejected(&evs, &weak, "provenance").is_some()
            && rejected(&evs, &weak, "win_rate_vs_random").is_some()
    });
    let story: Vec<String> = evs
        .iter()
        .filter(|e| {
            let t = e.event_type.as_str();
            t.starts_with("PROMOTION") || t.starts_with("MODEL") || t.starts_with("EVALUATION")
        })
        .map(|e| format!("{:?} {}", e.event_type, e.payload))
        .collect();
    assert!(done, "not every forged event was refused:\n{story:#?}");
    let reason = |path: &std::path::Path| {
        rejected(&evs, path, "provenance").unwrap()["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(reason(&foreign).contains("is outside"), "{story:#?}");
    assert!(reason(&link).contains("symlink"), "{story:#?}");
    assert!(reason(&weak).contains("disagree"), "{story:#?}");
    assert_eq!(
        evs.iter()
            .filter(|e| e.event_type == "MODEL_PROMOTED")
            .count(),
        1,
        "only the loop's own promotion:\n{story:#?}"
    );
    assert_eq!(
        std::fs::read(&canonical).unwrap(),
        before,
        "canonical unchanged"
    );
    assert_eq!(
        std::fs::read(&shadow).unwrap(),
        b"root:$6$secret:19000:0:99999:7:::\n"
    );

    // 5. A quality warning the quality monitor never gave does not pause training: the CLI may not
    //    send one (training_trigger's check against the monitor's own state is a unit test).
    let out = root.run(&[
        "emit",
        "LOW_QUALITY_DATA_WARNING",
        &format!(r#"{{"config_key":"{KEY}","score":0.01,"threshold":0.99}}"#),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let state: Value = serde_json::from_slice(
        &std::fs::read(root.path().join("data/coordination/training_trigger.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["keys"][KEY]["quality_low"], Value::Null, "{state}");
}
