//! Issue 6: the reference jobs run as real processes, chained the way the pipeline chains them
//! (selfplay → export → train → gauntlet), and each refuses damaged input with exit 1 and a clear
//! message on stderr.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{Value, WORKER};

const KEY: &str = "hex8_2p";

/// Runs `ringrift-worker job ARGS`, ARGS split at spaces (no argument here has one).
fn job(dir: &Path, args: &str) -> Output {
    Command::new(WORKER)
        .arg("job")
        .args(args.split_whitespace())
        .current_dir(dir)
        .env_remove("RINGRIFT_SUPERVISOR_SOCKET")
        .output()
        .expect("run ringrift-worker")
}

/// Runs a job that must succeed and returns its one-line JSON summary.
fn ok(dir: &Path, args: &str) -> Value {
    let out = job(dir, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    serde_json::from_str(stdout.trim()).expect("the summary is JSON")
}

/// Runs a job that must fail with `code` and say each of `needles` on stderr.
fn fails(dir: &Path, args: &str, code: i32, needles: &[&str]) {
    let out = job(dir, args);
    assert_eq!(out.status.code(), Some(code), "{args}: {out:?}");
    assert!(out.stdout.is_empty(), "no summary on failure");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    for needle in needles {
        assert!(err.contains(needle), "{args}: {needle:?} not in {err}");
    }
}

#[test]
fn the_loop_learns_to_beat_random_play() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = format!("data/games/{KEY}.db");
    let npz = format!("data/training/{KEY}.npz");
    let canonical = format!("models/{KEY}/canonical.bin");
    let candidate = format!("models/{KEY}/candidate.bin");

    // Round 1: no model yet, so self-play is random.
    let s = ok(
        dir,
        &format!(
            "selfplay --config-key {KEY} --board-type hex8 --num-players 2 --games 200 --db {db} --model {canonical} --seed 11"
        ),
    );
    assert_eq!(s["games"], 200);
    assert_eq!(s["model"], Value::Null);
    assert_eq!(s["last_game_id"], 200);
    let wins = &s["wins"];
    assert_eq!(wins[0].as_u64().unwrap() + wins[1].as_u64().unwrap(), 200);

    let e = ok(
        dir,
        &format!("export --config-key {KEY} --db {db} --output {npz}"),
    );
    assert_eq!(e["games"], 200);
    assert_eq!(e["samples"], s["moves"]);
    assert_eq!(e["last_game_id"], 200);
    assert!(dir.join(&npz).is_file());

    let t = ok(
        dir,
        &format!(
            "train --config-key {KEY} --input {npz} --output {candidate} --init {canonical} --epochs 10 --lr 0.01"
        ),
    );
    assert_eq!(t["samples"], e["samples"]);
    let (before, after) = (
        t["loss_before"].as_f64().unwrap(),
        t["loss_after"].as_f64().unwrap(),
    );
    assert!(after < before, "training lowered the loss: {t}");

    let g = ok(
        dir,
        &format!(
            "gauntlet --config-key {KEY} --candidate {candidate} --baseline {canonical} --games 200 --output eval/round1.json"
        ),
    );
    let rate = g["win_rate_vs_random"].as_f64().unwrap();
    eprintln!("round 1: loss {before} -> {after}, win rate vs random {rate}");
    assert!(rate >= 0.75, "candidate won only {rate} vs random: {g}");
    assert_eq!(g["games_vs_random"], 200);
    assert_eq!(g["candidate"], candidate.as_str());
    assert_eq!(g["games_vs_baseline"], 0, "no canonical model yet");
    assert_eq!(g["win_rate_vs_baseline"], Value::Null);
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval/round1.json")).unwrap()).unwrap();
    assert_eq!(file, g);

    // Promotion is not a job here: copy the candidate into place as the promoter would.
    std::fs::copy(dir.join(&candidate), dir.join(&canonical)).unwrap();

    // Round 2: self-play with the model, incremental export, training from the canonical model,
    // and a gauntlet that includes the baseline.
    let s2 = ok(
        dir,
        &format!("selfplay --config-key {KEY} --games 50 --db {db} --model {canonical}"),
    );
    assert_eq!(s2["model"], canonical.as_str());
    assert_eq!(s2["first_game_id"], 201);
    let e2 = ok(
        dir,
        &format!("export --config-key {KEY} --db {db} --output {npz} --since-id 200"),
    );
    assert_eq!(
        (e2["games"].clone(), e2["last_game_id"].clone()),
        (50.into(), 250.into())
    );
    let t2 = ok(
        dir,
        &format!("train --config-key {KEY} --input {npz} --output {candidate} --init {canonical}"),
    );
    assert_eq!(t2["init"], canonical.as_str());
    let g2 = ok(
        dir,
        &format!(
            "gauntlet --config-key {KEY} --candidate {candidate} --baseline {canonical} --games 40 --output eval/round2.json"
        ),
    );
    assert_eq!(g2["games_vs_baseline"], 40);
    let vs_baseline = g2["win_rate_vs_baseline"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&vs_baseline));
}

#[test]
fn damaged_inputs_fail_with_exit_1_and_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        dir,
        &format!("selfplay --config-key {KEY} --games 20 --db g.db --seed 1"),
    );
    ok(
        dir,
        &format!("export --config-key {KEY} --db g.db --output d.npz"),
    );
    ok(
        dir,
        &format!("train --config-key {KEY} --input d.npz --output m.bin"),
    );

    // A truncated export.
    let npz = std::fs::read(dir.join("d.npz")).unwrap();
    std::fs::write(dir.join("cut.npz"), &npz[..npz.len() * 2 / 3]).unwrap();
    fails(
        dir,
        &format!("train --config-key {KEY} --input cut.npz --output x.bin"),
        1,
        &["cut.npz is not a usable export", "truncated"],
    );
    assert!(!dir.join("x.bin").exists());

    // A games DB that is not a database.
    std::fs::write(dir.join("bad.db"), vec![0x42; 4096]).unwrap();
    fails(
        dir,
        &format!("export --config-key {KEY} --db bad.db --output y.npz"),
        1,
        &["bad.db is not a usable sqlite database"],
    );
    assert!(!dir.join("y.npz").exists());
    fails(
        dir,
        &format!("export --config-key {KEY} --db none.db --output y.npz"),
        1,
        &["none.db does not exist"],
    );

    // A model with a flipped byte, and one cut short.
    let mut model = std::fs::read(dir.join("m.bin")).unwrap();
    model[100] ^= 0x10;
    std::fs::write(dir.join("flipped.bin"), &model).unwrap();
    fails(
        dir,
        &format!("gauntlet --config-key {KEY} --candidate flipped.bin --games 2 --output r.json"),
        1,
        &["cannot use --candidate flipped.bin", "checksum mismatch"],
    );
    assert!(!dir.join("r.json").exists());
    std::fs::write(dir.join("short.bin"), &model[..50]).unwrap();
    fails(
        dir,
        &format!("selfplay --config-key {KEY} --games 1 --db g.db --model short.bin"),
        1,
        &["model file is truncated"],
    );

    // A model of another board.
    ok(dir, "selfplay --config-key hex6_2p --games 5 --db h6.db");
    ok(
        dir,
        "export --config-key hex6_2p --db h6.db --output h6.npz",
    );
    ok(
        dir,
        "train --config-key hex6_2p --input h6.npz --output h6.bin",
    );
    fails(
        dir,
        &format!("gauntlet --config-key {KEY} --candidate h6.bin --games 2 --output r.json"),
        1,
        &["model is for hex6_2p, not hex8_2p"],
    );
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (args, needles) in [
        (
            "selfplay --config-key chess_2p --games 1 --db g.db".to_string(),
            &[][..],
        ),
        (format!("selfplay --config-key {KEY} --db g.db"), &[]),
        ("dance".to_string(), &[]),
        (
            format!("selfplay --config-key {KEY} --num-players 3 --games 1 --db g.db"),
            &["--num-players 3 does not match --config-key hex8_2p"],
        ),
    ] {
        fails(dir, &args, 2, needles);
    }
    assert!(!dir.join("g.db").exists());
}

/// Issue 14: the gauntlet's sequential test against the baseline stops early both ways: it
/// rejects a copy of the baseline (H0 holds: no stronger) and accepts a clearly stronger
/// candidate, each well before its game limit, and records how (`sprt` in the results).
#[test]
fn the_sequential_test_rejects_a_copy_and_accepts_a_clearly_stronger_candidate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (db, npz) = ("games.db", "samples.npz");
    ok(
        dir,
        &format!("selfplay --config-key {KEY} --games 200 --db {db} --seed 5"),
    );
    ok(
        dir,
        &format!("export --config-key {KEY} --db {db} --output {npz}"),
    );
    ok(
        dir,
        &format!(
            "train --config-key {KEY} --input {npz} --output strong.bin --epochs 10 --lr 0.01"
        ),
    );
    // Barely trained: next to no knowledge of the game.
    ok(
        dir,
        &format!(
            "train --config-key {KEY} --input {npz} --output weak.bin --epochs 1 --lr 0.0000001"
        ),
    );
    let limit = 4000;
    let sprt = |candidate: &str, baseline: &str| {
        let g = ok(
            dir,
            &format!(
                "gauntlet --config-key {KEY} --candidate {candidate} --baseline {baseline} --games {limit} --output out.json --sprt 0,50,0.05,0.05"
            ),
        );
        eprintln!("{candidate} vs {baseline}: {}", g["sprt"]);
        g
    };
    let copy = sprt("strong.bin", "strong.bin");
    assert_eq!(copy["sprt"]["result"], "reject", "{copy}");
    let played = copy["games_vs_baseline"].as_u64().unwrap();
    assert!(played < limit, "stopped early: {copy}");
    assert!(copy["sprt"]["llr"].as_f64().unwrap() <= copy["sprt"]["lower"].as_f64().unwrap());
    // Against random play the fixed match is played whole.
    assert_eq!(copy["games_vs_random"], limit);

    let stronger = sprt("strong.bin", "weak.bin");
    assert_eq!(stronger["sprt"]["result"], "accept", "{stronger}");
    assert!(
        stronger["games_vs_baseline"].as_u64().unwrap() < 200,
        "{stronger}"
    );
    assert_eq!(stronger["sprt"]["elo1"], 50.0);

    // Without --sprt the match against the baseline is a fixed one, as before.
    let fixed = ok(
        dir,
        &format!(
            "gauntlet --config-key {KEY} --candidate strong.bin --baseline weak.bin --games 20 --output out.json"
        ),
    );
    assert_eq!(fixed["games_vs_baseline"], 20);
    assert_eq!(fixed["sprt"], Value::Null);
    fails(
        dir,
        &format!(
            "gauntlet --config-key {KEY} --candidate strong.bin --games 2 --output out.json --sprt 50,0,0.05,0.05"
        ),
        2,
        &["elo0 (50) must be less than elo1 (0)"],
    );
}
