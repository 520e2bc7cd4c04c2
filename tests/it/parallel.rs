//! Issue 14, item 1: training runs per config key in parallel, up to the node's
//! `pipeline.capacity.training_slots`; one slow key never waits for another. With one slot the
//! keys take turns.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;

const WITHIN: Duration = Duration::from_secs(60);
const KEYS: [&str; 2] = ["hex8_2p", "hex6_2p"];

/// The default configuration on two config keys with `slots` training slots and two GPUs, whose
/// train job records when it starts and ends (and the GPU it was given) and takes 2 s.
fn config(slots: u32) -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/unified_loop.yaml"
    ))
    .unwrap();
    let builtin = r#"command: ["{worker}", "job", "train", "--config-key", "{config_key}", "--input", "{npz_path}", "--output", "{candidate_path}", "--init", "{model_path}", "--epochs", "{epochs}", "--lr", "{learning_rate}"]"#;
    assert!(
        default.contains(builtin),
        "the shipped train template changed"
    );
    let slow = r#"command: ["sh", "-c", "echo start {config_key} $(date +%s.%N) ${{CUDA_VISIBLE_DEVICES:-none}} >> {root}/train-times.txt; sleep 2; echo model > {candidate_path}; echo end {config_key} $(date +%s.%N) >> {root}/train-times.txt"]"#;
    let text = default
        .replace(builtin, slow)
        .replace(
            "  config_keys: [hex8_2p]\n",
            "  config_keys: [hex8_2p, hex6_2p]\n",
        )
        .replace(
            "    training_slots: 1 ",
            &format!("    training_slots: {slots} "),
        )
        .replace("    gpus: auto ", "    gpus: 2 ");
    assert!(text.contains(&format!("training_slots: {slots} ")));
    text
}

/// An export of each key in data/training/, from games played outside data/games/ (so
/// auto_export has nothing to add).
fn exports(root: &Root) {
    let games = root.path().join("games");
    std::fs::create_dir_all(&games).unwrap();
    std::fs::create_dir_all(root.path().join("data/training")).unwrap();
    for (i, key) in KEYS.iter().enumerate() {
        let db = games.join(format!("{key}.db"));
        play_games(root, &db, key, 10, 7 + i as u32);
        let npz = root.path().join(format!("data/training/{key}.npz"));
        worker_job(
            root,
            &[
                "export",
                "--config-key",
                key,
                "--db",
                &db.display().to_string(),
                "--output",
                &npz.display().to_string(),
            ],
        );
    }
}

/// Each key's train run, from train-times.txt: (start, end, CUDA_VISIBLE_DEVICES).
fn runs(root: &Root) -> BTreeMap<String, (f64, f64, String)> {
    let text = std::fs::read_to_string(root.path().join("train-times.txt")).unwrap_or_default();
    let mut starts = BTreeMap::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["start", key, t, gpu] => {
                starts.insert(
                    key.to_string(),
                    (t.parse::<f64>().unwrap(), gpu.to_string()),
                );
            }
            ["end", key, t] => {
                let (start, gpu) = starts[*key].clone();
                out.insert(key.to_string(), (start, t.parse().unwrap(), gpu));
            }
            _ => panic!("unexpected line {line:?} in train-times.txt"),
        }
    }
    out
}

/// Runs training_trigger on both keys' exports with `slots` training slots; returns each key's
/// run once both are trained.
fn train_both(slots: u32) -> (Root, BTreeMap<String, (f64, f64, String)>) {
    let root = Root::with_config(&config(slots));
    exports(&root);
    root.ok_with_env(
        &["start", "training_trigger"],
        &[
            ("RINGRIFT_HTTP__ADDR", "127.0.0.1:0"),
            ("RINGRIFT_DAEMON_INTERVAL", "1"),
            ("RINGRIFT_DEFAULTS__HEARTBEAT_INTERVAL", "0.5"),
            ("RINGRIFT_DAEMONS__TRAINING_TRIGGER__MIN_SAMPLES", "10"),
            // One run per key: a later export (none comes) would wait.
            ("RINGRIFT_DAEMONS__TRAINING_TRIGGER__COOLDOWN", "600"),
        ],
    );
    let mut seen_running = 0;
    let done = wait_until(WITHIN, || {
        // A report without `running` yet (the start's) counts as none running.
        let running = root
            .daemon("training_trigger")
            .health
            .details
            .get("running")
            .and_then(|r| r.as_object())
            .map_or(0, |m| m.len());
        seen_running = seen_running.max(running);
        runs(&root).len() == KEYS.len()
    });
    assert!(
        done,
        "both keys not trained within {WITHIN:?}: {:?}\n{}",
        runs(&root),
        root.ok(&["status"])
    );
    let announced = wait_until(WITHIN, || root.events_of("TRAINING_COMPLETED").len() >= 2);
    assert!(announced, "{:?}", root.events_of("TRAINING_COMPLETED"));
    // Health said which keys ran, as many at once as there are slots.
    assert_eq!(
        seen_running, slots as usize,
        "health listed at most {seen_running} running keys with {slots} slot(s)"
    );
    let r = runs(&root);
    (root, r)
}

fn overlap(a: &(f64, f64, String), b: &(f64, f64, String)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[test]
fn two_training_slots_train_two_keys_at_once_each_on_its_own_gpu() {
    let (root, runs) = train_both(2);
    let (a, b) = (&runs["hex8_2p"], &runs["hex6_2p"]);
    assert!(overlap(a, b), "the runs did not overlap: {runs:?}");
    // Each job had its slot's GPU.
    let mut gpus = vec![a.2.as_str(), b.2.as_str()];
    gpus.sort();
    assert_eq!(gpus, ["0", "1"], "{runs:?}");
    // Both candidates were announced, each of its own key.
    let completed = root.events_of("TRAINING_COMPLETED");
    for key in KEYS {
        assert!(
            completed.iter().any(|e| e.payload["config_key"] == key),
            "{key}: {completed:?}"
        );
    }
}

#[test]
fn one_training_slot_trains_the_keys_in_turn() {
    let (root, runs) = train_both(1);
    let (a, b) = (&runs["hex8_2p"], &runs["hex6_2p"]);
    assert!(
        !overlap(a, b),
        "the runs overlapped with one slot: {runs:?}"
    );
    assert_eq!((a.2.as_str(), b.2.as_str()), ("0", "0"), "{runs:?}");
    drop(root);
}

/// Each gauntlet's (key, start, end), by candidate file name, from eval-times.txt.
fn gauntlets(root: &Root) -> BTreeMap<String, (String, f64, f64)> {
    let text = std::fs::read_to_string(root.path().join("eval-times.txt")).unwrap_or_default();
    let mut starts = BTreeMap::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["start", key, name, t] => {
                starts.insert(
                    name.to_string(),
                    (key.to_string(), t.parse::<f64>().unwrap()),
                );
            }
            ["end", name, t] => {
                let (key, start) = starts[*name].clone();
                out.insert(name.to_string(), (key, start, t.parse().unwrap()));
            }
            _ => panic!("unexpected line {line:?} in eval-times.txt"),
        }
    }
    out
}

#[test]
fn gauntlets_of_different_keys_run_at_once_and_one_key_never_has_two() {
    // A trainer of one's own (models are then only checked to be non-empty) and a gauntlet that
    // takes 2 s; three evaluation slots.
    let gauntlet = r#"command: ["{worker}", "job", "gauntlet", "--config-key", "{config_key}", "--candidate", "{candidate_path}", "--baseline", "{model_path}", "--games", "{games}", "--output", "{output_path}", "--sprt", "{sprt}", "--references", "{reference_dir}"]"#;
    let slow = r#"command: ["sh", "-c", "n=$(basename {candidate_path}); echo start {config_key} $n $(date +%s.%N) >> {root}/eval-times.txt; sleep 2; echo '{{\"win_rate_vs_random\": 0.9}}' > {output_path}; echo end $n $(date +%s.%N) >> {root}/eval-times.txt"]"#;
    let text = config(1)
        .replace(gauntlet, slow)
        .replace("    evaluation_slots: 1 ", "    evaluation_slots: 3 ");
    assert!(text.contains("evaluation_slots: 3 ") && text.contains("eval-times"));
    let root = Root::with_config(&text);
    let names = ["hex8_2p-1.bin", "hex8_2p-2.bin", "hex6_2p-1.bin"];
    for name in names {
        let key = &name[..7];
        let dir = root.path().join("models/candidates").join(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), b"model").unwrap();
    }
    root.ok_with_env(
        &["start", "evaluation"],
        &[
            ("RINGRIFT_HTTP__ADDR", "127.0.0.1:0"),
            ("RINGRIFT_DAEMON_INTERVAL", "1"),
            ("RINGRIFT_DEFAULTS__HEARTBEAT_INTERVAL", "0.5"),
        ],
    );
    let done = wait_until(WITHIN, || gauntlets(&root).len() == names.len());
    assert!(
        done,
        "not all evaluated within {WITHIN:?}: {:?}\n{}",
        gauntlets(&root),
        root.ok(&["status"])
    );
    let g = gauntlets(&root);
    let span = |n: &str| (g[n].1, g[n].2, String::new());
    assert!(
        !overlap(&span("hex8_2p-1.bin"), &span("hex8_2p-2.bin")),
        "two gauntlets of one key at once: {g:?}"
    );
    assert!(
        overlap(&span("hex8_2p-1.bin"), &span("hex6_2p-1.bin"))
            || overlap(&span("hex8_2p-2.bin"), &span("hex6_2p-1.bin")),
        "the keys' gauntlets did not overlap: {g:?}"
    );
    let announced = wait_until(WITHIN, || {
        root.events_of("EVALUATION_COMPLETED").len() >= names.len()
    });
    assert!(announced, "{:?}", root.events_of("EVALUATION_COMPLETED"));
}
