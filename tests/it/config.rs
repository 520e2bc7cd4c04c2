//! Issue 10, "configuration means what it says": `config check` refuses what the worker would not
//! use as written, and what it accepts reaches the daemons and jobs exactly as written.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn config_check_names_every_value_the_worker_would_not_use_as_written() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n\
         \x20 training_trigger:\n    cooldown: \"5m\"\n    min_samples: \"lots\"\n\
         \x20 auto_promotion:\n    min_win_rate_vs_random: 75\n\
         \x20 auto_export:\n    threshold_games: -3\n\
         \x20 mine:\n    command: [\"no-such-program-rr\", \"--serve\"]\n    env:\n      VER: 1.10\n\
         pipeline:\n  config_keys: [square8_2p]\n",
    );
    let out = root.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    let file = root.path().join("config/unified_loop.yaml");
    let at = |line: usize, key: &str| format!("{}:{line}: {key}: ", file.display());
    for expected in [
        at(6, "daemons.training_trigger.min_samples") + "must be a whole number",
        at(8, "daemons.auto_promotion.min_win_rate_vs_random") + "must be a number from 0 to 1",
        at(10, "daemons.auto_export.threshold_games") + "must be a whole number",
        at(12, "daemons.mine.command") + "program \"no-such-program-rr\" is not found on PATH",
        at(14, "daemons.mine.env.VER") + "environment values must be strings",
        at(16, "pipeline.config_keys") + "'square8_2p' cannot be played by the built-in",
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("quote it"), "{err}");
    assert!(
        !err.contains("cooldown"),
        "\"5m\" is a valid duration:\n{err}"
    );
    assert!(err.contains("(6 problems)"), "{err}");
}

#[test]
fn durations_with_units_reach_the_worker_as_written() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  job_reaper:\n    interval: 1m30s\n    stuck_after: 1m30s\n    reap_grace: 500ms\n\
         \x20   heartbeat_interval: 0.2\n",
    );
    let check = root.ok(&["config", "check"]);
    assert!(check.contains("ok"), "{check}");
    root.ok(&["start", "job_reaper"]);
    // The worker uses stuck_after 1m30s as 90 s, and reap_grace as written.
    let text = root.wait_log("job_reaper", "stuck after 90s", T);
    assert!(text.contains("500ms"), "{text}");
}

#[test]
fn environment_values_reach_the_child_byte_for_byte() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  envy:\n    command: [\"sh\", \"-c\", \"echo \\\"VER=[$VER] ON=[$ON] OVR=[$OVR]\\\"; exec sleep 100\"]\n\
         \x20   env:\n      VER: \"1.10\"\n      ON: 'yes'\n",
    );
    // An override from the environment is text too, never read as a YAML number.
    root.ok_with_env(
        &["start", "envy"],
        &[("RINGRIFT_DAEMONS__ENVY__ENV__OVR", "007")],
    );
    let text = root.wait_log("envy", "VER=", T);
    assert!(text.contains("VER=[1.10] ON=[yes] OVR=[007]"), "{text}");
}

#[test]
fn doubled_braces_in_a_job_template_are_literal_braces() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         defaults:\n  heartbeat_interval: 0.2\n\
         daemons:\n\
         \x20 queue_populator:\n    interval: 0.2\n    target_depth: 1\n\
         \x20 selfplay_scheduler:\n    interval: 0.2\n\
         pipeline:\n  jobs:\n    selfplay:\n      command: [\"sh\", \"-c\", 'printf \"%s\\n\" \"$1\" >> \"$2\"; exit 1', \"sh\",\n\
         \x20       '{{\"seed\": {seed}, \"key\": \"{config_key}\"}}', \"{root}/args.txt\"]\n",
    );
    root.ok(&["config", "check"]);
    root.ok(&["start", "queue_populator", "selfplay_scheduler"]);
    let args = root.path().join("args.txt");
    let mut text = String::new();
    assert!(
        wait_until(T, || {
            text = std::fs::read_to_string(&args).unwrap_or_default();
            !text.is_empty()
        }),
        "no selfplay job ran:\n{}",
        root.master_log()
    );
    let first = text.lines().next().unwrap();
    let v: serde_json::Value = serde_json::from_str(first).expect("the argument is JSON");
    assert_eq!(v["key"], "hex8_2p", "{first}");
    assert!(v["seed"].is_u64(), "{first}");

    // A lone brace is refused by config check, naming the job.
    root.write_config(
        "pipeline:\n  jobs:\n    train:\n      command: [\"sh\", '{\"lr\": {learning_rate}}']\n",
    );
    let out = root.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("pipeline.jobs.train.command: '{\"lr\": {learning_rate}' at byte 0"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_program_that_cannot_be_run_is_refused_by_check_and_warned_about_by_start() {
    let root = Root::with_config(
        "http:\n  enabled: false\n\
         daemons:\n  fine:\n    command: [\"sleep\", \"1000\"]\n\
         \x20 ghost:\n    command: [\"./bin/ghost\"]\n",
    );
    let out = root.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let file = root.path().join("config/unified_loop.yaml");
    let expected = format!(
        "{}:7: daemons.ghost.command: program \"./bin/ghost\" cannot be run",
        file.display()
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));

    // Not executable is named as such.
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::write(root.path().join("bin/ghost"), "#!/bin/sh\n").unwrap();
    let out = root.run(&["config", "check"]);
    assert!(
        stderr(&out).contains("program \"./bin/ghost\" is not executable"),
        "{}",
        stderr(&out)
    );

    // `start` warns and starts what it can.
    let out = root.run(&["start", "fine"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains("warning: ") && stderr(&out).contains("daemons.ghost.command"),
        "{}",
        stderr(&out)
    );
    assert_eq!(root.state("fine"), DaemonState::Running);
}

/// Issue 12: the embedded default carries the bus as a disabled `nats` entry. A disabled daemon's
/// program need not exist (`config check` notes it and passes), an enabled one's must.
#[test]
fn a_disabled_daemon_needs_no_program_and_an_enabled_one_does() {
    let root = Root::new();
    // A PATH on which no nats-server can be found (Debian installs it in /usr/sbin).
    let empty = tempfile::tempdir().unwrap();
    let check = |env: &[(&str, &str)]| {
        root.cmd(&["config", "check"])
            .env("PATH", empty.path())
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = check(&[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("<embedded default>: ok (16 daemons, 13 enabled: "),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("nats"), "{}", stdout(&out));
    let note = stderr(&out);
    assert!(
        note.starts_with("note: <embedded default>:")
            && note.contains(
                "daemons.nats.command: program \"nats-server\" is not found on PATH (or not \
                 executable); give its full path (nats is disabled: needed only once it is enabled"
            ),
        "{note}"
    );

    // Enabled (here from the environment), the same entry is refused, naming the daemon.
    let out = check(&[("RINGRIFT_DAEMONS__NATS__ENABLED", "true")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains(
            "daemons.nats.command: program \"nats-server\" is not found on PATH (or not executable)"
        ),
        "{}",
        stderr(&out)
    );

    // A file that enables nats with a program that does not exist: refused at its line.
    root.write_config(
        "http:\n  enabled: false\n\
         daemons:\n  nats:\n    enabled: true\n\
         \x20   command: [\"no-such-nats-server-rr\", \"-c\", \"config/nats.conf\"]\n\
         \x20   ready: {http: \"http://127.0.0.1:8222/healthz\"}\n",
    );
    let out = root.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let expected = format!(
        "{}:6: daemons.nats.command: program \"no-such-nats-server-rr\" is not found on PATH",
        root.path().join("config/unified_loop.yaml").display()
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(stderr(&out).contains("(1 problem)"), "{}", stderr(&out));
}
