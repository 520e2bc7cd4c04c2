//! Issue 14, the loop at a glance: per config key, the generation, games (in all and since the
//! last export), model age, stage, last promotion and rating, as the pipeline daemons report them
//! and the supervisor merges them: in `status --json`, `status`, `watch`, `GET /pipeline` and
//! `/metrics`; and the games table says which model played each game.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringrift::pipeline_view::{KeyView, Stage};

use crate::common::*;
use crate::pipeline::SMALL_ENV;

const KEY: &str = "hex8_2p";
/// Generous: the loop takes seconds here, but CI machines are busy.
const LOOP: Duration = Duration::from_secs(240);
/// How long each train job sleeps before it trains, so the test can see the stage.
const TRAIN_SLEEP: &str = "4";

/// The shipped configuration, with a train job that sleeps first (the built-in trainer takes
/// well under a second here, too short to be seen between two heartbeats).
fn config_with_slow_training() -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/unified_loop.yaml"
    ))
    .unwrap();
    let train = default
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(r#"command: ["{worker}", "job", "train""#)
        })
        .expect("the train job's command")
        .to_string();
    let slow = train.replace(
        r#"command: ["{worker}","#,
        &format!(
            r#"command: ["sh", "-c", "sleep {TRAIN_SLEEP} && exec \"$@\"", "train", "{{worker}}","#
        ),
    );
    assert_ne!(slow, train);
    default.replace(&train, &slow)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The answer to `method path` on the supervisor's HTTP address: (status code, body).
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the HTTP address");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(format!("{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The line of `watch --once` (or `status`) about `KEY` in the per-key table.
fn key_line(frame: &str) -> Option<String> {
    frame
        .lines()
        .find(|l| l.starts_with(&format!("{KEY} ")))
        .map(str::to_string)
}

#[test]
fn the_per_key_view_follows_the_loop_to_a_promotion_in_status_http_metrics_and_watch() {
    let root = Root::with_config(&config_with_slow_training());
    let started = unix_now();
    root.ok_with_env(&["start", "--all"], SMALL_ENV);

    // While the first candidate trains, `watch` and `status` show the key's stage as training.
    let mut frame = String::new();
    let training = wait_until(LOOP, || {
        frame = root.ok(&["watch", "--once"]);
        key_line(&frame).is_some_and(|l| l.contains("training"))
    });
    assert!(training, "no training stage seen in watch:\n{frame}");
    assert!(
        frame.contains("GEN") && frame.contains("MODEL AGE"),
        "{frame}"
    );
    let view = root.status().pipeline[KEY].clone();
    assert!(view.stages.contains(&Stage::Training), "{view:#?}");
    assert!(view.stage >= Stage::Training, "the latest stage: {view:#?}");
    assert_eq!(view.generation, Some(0), "nothing promoted yet: {view:#?}");
    assert!(view.games_total.is_some_and(|n| n >= 300), "{view:#?}");
    assert!(
        view.last_export_at.is_some_and(|t| t >= started),
        "{view:#?}"
    );
    assert_eq!(
        (view.model_sha256.as_ref(), view.model_age_secs),
        (None, None)
    );

    // Then the promotion: generation 1, the canonical model's hash and age, the last promotion.
    let mut evs = Vec::new();
    let promoted = wait_until(LOOP, || {
        evs = root.events_of("MODEL_PROMOTED");
        !evs.is_empty()
    });
    assert!(promoted, "no promotion:\n{}", root.ok(&["status"]));
    let canonical = root.path().join(format!("models/canonical_{KEY}.bin"));
    let sha256sum = || {
        let sum = std::process::Command::new("sha256sum")
            .arg(&canonical)
            .output()
            .unwrap();
        stdout(&sum).split_whitespace().next().unwrap().to_string()
    };
    let sha = sha256sum();
    let mut view: Option<KeyView> = None;
    let reported = wait_until(Duration::from_secs(30), || {
        view = root.status().pipeline.get(KEY).cloned();
        view.as_ref()
            .is_some_and(|v| v.generation >= Some(1) && v.model_sha256.is_some())
    });
    let view = view.unwrap();
    assert!(reported, "{view:#?}");
    let promotion = view.last_promotion.expect("the last promotion");
    assert!(
        promotion.generation == view.generation.unwrap()
            && (started..=unix_now()).contains(&promotion.at),
        "{view:#?}"
    );
    // The generation and the rating are those MODEL_PROMOTED announced (the ratings DB's).
    let first = &evs[0].payload;
    assert_eq!(first["generation"], 1, "{first}");
    if view.generation == Some(1) {
        assert_eq!(view.rating, first["rating_elo"].as_f64(), "{first}");
        assert_eq!(
            view.model_sha256.as_deref(),
            Some(sha.as_str()),
            "{view:#?}"
        );
    }
    let age = view.model_age_secs.expect("the model's age");
    assert!((0.0..300.0).contains(&age), "{view:#?}");
    assert!(view.games_total.is_some_and(|n| n >= 300), "{view:#?}");
    assert!(view.games_since_export.is_some(), "{view:#?}");
    assert!(
        view.rating.is_some(),
        "the ladder rates the canonical model: {view:#?}"
    );
    assert_eq!(
        view.stage,
        view.stages.last().copied().unwrap_or(Stage::Idle)
    );

    // GET /pipeline answers the same view (HEAD too, without a body).
    let addr = root.status().supervisor.http.expect("the HTTP address");
    let (code, body) = http(&addr, "GET", "/pipeline");
    assert_eq!(code, 200, "{body}");
    let http_view: BTreeMap<String, KeyView> = serde_json::from_str(&body).unwrap();
    let v = &http_view[KEY];
    assert!(v.generation >= view.generation && v.games_total >= view.games_total);
    assert!(
        v.model_age_secs.is_some() && v.last_promotion.is_some(),
        "{body}"
    );
    let (code, body) = http(&addr, "HEAD", "/pipeline");
    assert_eq!((code, body.as_str()), (200, ""));

    // /metrics: a gauge per fact, and the stage.
    let (code, metrics) = http(&addr, "GET", "/metrics");
    assert_eq!(code, 200);
    let sample = |name: &str| -> Option<f64> {
        let prefix = format!("{name}{{config_key=\"{KEY}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse().unwrap()))
    };
    assert!(
        sample("ringrift_pipeline_generation").is_some_and(|g| g >= 1.0),
        "{metrics}"
    );
    assert!(
        sample("ringrift_pipeline_games").is_some_and(|g| g >= 300.0),
        "{metrics}"
    );
    assert!(
        sample("ringrift_pipeline_games_since_export").is_some(),
        "{metrics}"
    );
    assert!(
        sample("ringrift_pipeline_model_age_seconds").is_some(),
        "{metrics}"
    );
    assert!(sample("ringrift_pipeline_last_promotion_timestamp_seconds").is_some());
    assert_eq!(
        sample("ringrift_pipeline_rating_elo"),
        view.rating,
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE ringrift_pipeline_model_age_seconds gauge"));
    let current: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("ringrift_pipeline_stage{{config_key=\"{KEY}\",")))
        .filter(|l| l.ends_with(" 1"))
        .collect();
    assert_eq!(current.len(), 1, "one current stage: {metrics}");

    // `watch` and `status` show the key with its generation.
    let frame = root.ok(&["watch", "--once"]);
    let line = key_line(&frame).unwrap_or_else(|| panic!("no {KEY} line:\n{frame}"));
    assert!(line.contains("gen "), "{line}");
    let table = root.ok(&["status"]);
    assert!(table.contains("pipeline (per config key):"), "{table}");
    assert!(key_line(&table).is_some(), "{table}");
    // `status NAME` is about one daemon: no per-key view.
    let one = parse_status(&root.ok(&["status", "--json", "auto_export"]));
    assert!(one.pipeline.is_empty(), "{:#?}", one.pipeline);

    // The games table names the model of each game: random play first, then the canonical model.
    let db = rusqlite::Connection::open(root.path().join(format!("data/games/{KEY}.db"))).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert!(count("SELECT count(*) FROM games WHERE model = 'random'") >= 300);
    assert_eq!(count("SELECT count(*) FROM games WHERE model IS NULL"), 0);
    // Joined on the canonical model's SHA-256, as a user would (`sha256sum` of the file).
    let played = wait_until(Duration::from_secs(60), || {
        count(&format!(
            "SELECT count(*) FROM games WHERE model = '{}'",
            sha256sum()
        )) > 0
    });
    assert!(played, "no game played by the canonical model");
}
