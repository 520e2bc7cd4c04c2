//! `pipeline reset-backoff KEY`: clears a config key's failure backoff in training_trigger,
//! auto_export and evaluation. The CLI records the reset ([`ringrift::backoff`]) and, when a
//! supervisor runs, emits BACKOFF_RESET so that training_trigger and auto_export look at the key
//! at once; each daemon drops the failures it recorded before the reset. It reads the daemons'
//! state files only to say what it found; it never writes them.

use ringrift::config::Config;
use ringrift::protocol::Emit;
use serde_json::Value;

use super::*;

/// Resets `key`'s backoff under `root`; exit 0 when recorded, 2 for a key that is not one of
/// `config`'s `pipeline.config_keys`, 1 when the reset cannot be recorded.
pub(crate) fn reset_backoff(paths: &Paths, config: &Config, key: &str) -> i32 {
    let keys = &config.pipeline.config_keys;
    if !keys.iter().any(|k| k == key) {
        eprintln!(
            "error: unknown config key '{key}': pipeline.config_keys has {} ({})",
            keys.join(", "),
            ringrift::catalog::suggestion(key, keys.iter().map(String::as_str))
        );
        return EXIT_USAGE;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    for line in found(&paths.root, key, now) {
        println!("{key}: {line}");
    }
    if let Err(e) = ringrift::backoff::record_reset(&paths.root, key, now) {
        eprintln!(
            "error: cannot record the reset in {}: {e}",
            ringrift::backoff::resets_path(&paths.root).display()
        );
        return EXIT_FAILED;
    }
    let emitted = match Client::connect(paths) {
        Err(_) => None,
        Ok(mut client) => Some(client.call(
            &Request::Emit(Emit {
                event_type: "BACKOFF_RESET".into(),
                payload: serde_json::json!({ "config_key": key }),
                source: None,
            }),
            Duration::from_secs(10),
        )),
    };
    match emitted {
        Some(Ok(FromSupervisor::Emitted { seq, .. })) => println!(
            "{key}: backoff reset (BACKOFF_RESET seq {seq}): training_trigger and auto_export \
             look at {key} again now, evaluation at its next cycle"
        ),
        Some(Ok(other)) => {
            println!(
                "{key}: backoff reset; each daemon applies it at its next look at {key} (the \
                 supervisor did not take BACKOFF_RESET: {other:?})"
            );
        }
        Some(Err(e)) => println!(
            "{key}: backoff reset; each daemon applies it at its next look at {key} (cannot \
             reach the supervisor: {e})"
        ),
        None => println!(
            "{key}: backoff reset; no supervisor runs: the daemons apply it when they start"
        ),
    }
    0
}

/// What the daemons' state files say about `key`'s failures now, one line per step.
fn found(root: &Path, key: &str, now: f64) -> Vec<String> {
    let state = |daemon: &str| -> Value {
        std::fs::read(
            root.join("data/coordination")
                .join(format!("{daemon}.json")),
        )
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
    };
    let training = state("training_trigger");
    let t = &training["keys"][key];
    let failures = t["failures"].as_u64().unwrap_or(0);
    let train = if failures == 0 {
        "training: no failed runs".to_string()
    } else {
        let since = t["last_failure_at"]
            .as_f64()
            .map(|at| format!(", the last {:.0} s ago", (now - at).max(0.0)))
            .unwrap_or_default();
        format!("training: {failures} failed run(s) in a row{since}: forgotten")
    };
    let export = match &state("auto_export")["keys"][key]["failing"] {
        Value::Object(f) => format!(
            "export: {} failed attempt(s) ({}): forgotten",
            f.get("attempts").and_then(Value::as_u64).unwrap_or(0),
            f.get("error").and_then(Value::as_str).unwrap_or("")
        ),
        _ => "export: not failing".to_string(),
    };
    let dir = format!("/{key}/");
    let candidates = state("evaluation")["attempts"]
        .as_object()
        .map_or(0, |a| a.keys().filter(|c| c.contains(&dir)).count());
    let evaluation = if candidates == 0 {
        "evaluation: no failed attempts".to_string()
    } else {
        format!("evaluation: failed attempts of {candidates} candidate(s): forgotten")
    };
    vec![train, export, evaluation]
}
