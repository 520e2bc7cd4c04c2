//! Issue 10, control: every request answers with what became of it, `stop --force` and `kill`,
//! watchdogs that do not count the supervisor's own sleep, readiness for plain programs, and reload
//! at the right depth — with the real binaries and short timings.

use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(20);

/// A daemon entry running the fault worker with these options.
fn fault(name: &str, opts: &[&str], extra: &str) -> String {
    let args: String = opts.iter().map(|a| format!(", \"{a}\"")).collect();
    format!(
        "  {name}:\n    command: [\"{WORKER}\", \"fault\"{args}]\n    protocol: true\n    heartbeat_interval: 0.1\n{extra}"
    )
}

/// A plain program (`sh -c SCRIPT`) daemon entry.
fn plain(name: &str, script: &str, extra: &str) -> String {
    format!("  {name}:\n    command: [\"sh\", \"-c\", {script:?}]\n{extra}")
}

fn config(entries: &[String]) -> String {
    format!(
        "defaults:\n  backoff_initial: 50ms\n  grace_period: 2\ndaemons:\n{}",
        entries.concat()
    )
}

/// Runs `f`, insisting that it returns within `secs` seconds (`what` names it).
fn within<T>(secs: u64, what: &str, f: impl FnOnce() -> T) -> T {
    let asked = Instant::now();
    let out = f();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(secs),
        "{what} took {took:?} (limit {secs} s)"
    );
    out
}

#[test]
fn a_stop_overridden_by_a_start_answers_at_once_and_says_so() {
    let root = Root::with_config(&config(&[fault(
        "stubborn",
        &["--ignore-sigterm"],
        "    grace_period: 4\n",
    )]));
    root.ok(&["start", "stubborn"]);
    let old = root.pid("stubborn").unwrap();
    let stop = root.cmd(&["stop", "stubborn"]).output_async();
    root.wait_state("stubborn", DaemonState::ShuttingDown, T);
    let start = root.cmd(&["start", "stubborn"]).output_async();
    let stopped = within(3, "the stop answers before the grace period ends", || {
        stop.wait_with_output().unwrap()
    });
    assert_eq!(stopped.status.code(), Some(1), "{}", stdout(&stopped));
    assert!(
        stdout(&stopped).contains("stop overridden"),
        "{}",
        stdout(&stopped)
    );
    // The start comes true once the old process is gone (SIGKILL at the end of its grace period).
    let started = start.wait_with_output().unwrap();
    assert!(started.status.success(), "{}", stdout(&started));
    assert!(root.pid("stubborn").is_some_and(|p| p != old));
    assert_eq!(root.state("stubborn"), DaemonState::Running);
}

#[test]
fn a_start_that_cannot_spawn_answers_with_the_reason() {
    let root = Root::with_config(
        "daemons:\n  ghost:\n    command: [\"/nonexistent/ghost-daemon\"]\n    backoff_initial: 60\n    backoff_max: 120\n",
    );
    let out = within(10, "start", || root.run(&["start", "ghost"]));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("cannot spawn"), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(text.contains("next attempt in"), "{text}");
    assert_eq!(root.state("ghost"), DaemonState::Backoff);
}

#[test]
fn a_worker_that_reports_shutting_down_and_hangs_is_killed_at_the_end_of_its_grace_period() {
    let root = Root::with_config(&config(&[fault(
        "hung",
        &["--hang-shutting-down-after-ms", "200"],
        "    grace_period: 1\n    restart: never\n",
    )]));
    root.ok(&["start", "hung"]);
    let pid = root.pid("hung").unwrap();
    root.wait_state("hung", DaemonState::ShuttingDown, T);
    // `stop` answers within the grace period plus a margin, saying how it ended.
    let out = within(4, "stop", || root.run(&["stop", "hung"]));
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("STOPPED"), "{}", stdout(&out));
    assert!(!alive(pid));
    root.assert_logged("hung: still running after the 1s grace period");
    // The same worker, restarted: `restart` answers too, with a new process.
    root.ok(&["start", "hung"]);
    let pid = root.pid("hung").unwrap();
    root.wait_state("hung", DaemonState::ShuttingDown, T);
    within(4, "restart", || root.ok(&["restart", "hung"]));
    assert!(root.pid("hung").is_some_and(|p| p != pid));
    assert!(!alive(pid));
    // And `shutdown` ends with it.
    let pid = root.pid("hung").unwrap();
    root.wait_state("hung", DaemonState::ShuttingDown, T);
    let sup = root.supervisor_pid().unwrap();
    within(4, "shutdown", || root.ok(&["shutdown"]));
    assert!(wait_until(T, || !alive(sup) && !alive(pid)));
}

#[test]
fn stop_force_and_kill_skip_the_grace_period() {
    let root = Root::with_config(&config(&[
        fault("deaf", &["--ignore-sigterm"], "    grace_period: 60\n"),
        fault("deaf2", &["--ignore-sigterm"], "    grace_period: 60\n"),
        plain("sleeper", "exec sleep 1000", "    grace_period: 60\n"),
    ]));
    root.ok(&["start", "deaf", "deaf2", "sleeper"]);
    let pid = root.pid("deaf").unwrap();
    let out = within(5, "stop --force", || root.ok(&["stop", "--force", "deaf"]));
    assert!(out.contains("killed at once"), "{out}");
    assert!(!alive(pid));
    assert_eq!(
        root.daemon("deaf").last_exit.as_deref(),
        Some("killed by SIGKILL")
    );

    // A stop already under way is cut short by a forced one.
    let pid = root.pid("deaf2").unwrap();
    let slow = root.cmd(&["stop", "deaf2"]).output_async();
    root.wait_state("deaf2", DaemonState::ShuttingDown, T);
    within(5, "kill", || root.ok(&["kill", "deaf2"]));
    assert!(slow.wait_with_output().unwrap().status.success());
    assert!(!alive(pid));

    // kill --signal sends the signal of the caller's choice.
    let pid = root.pid("sleeper").unwrap();
    root.ok(&["kill", "--signal", "INT", "sleeper"]);
    assert!(!alive(pid));
    let d = root.daemon("sleeper");
    assert_eq!(d.last_exit.as_deref(), Some("killed by SIGINT"));
    assert_eq!(d.state, DaemonState::Stopped);

    let out = root.run(&["kill", "--signal", "BOGUS", "sleeper"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown signal 'BOGUS'")
            || stdout(&out).contains("unknown signal 'BOGUS'")
    );
}

#[test]
fn a_frozen_supervisor_does_not_count_its_own_sleep_against_the_daemons() {
    let root = Root::with_config(&config(&[
        fault("a", &[], "    heartbeat_timeout: 1\n"),
        fault(
            "b",
            &[],
            "    interval: 0.1\n    heartbeat_timeout: 1\n    stall_timeout: 1.5\n",
        ),
    ]));
    root.ok(&["start", "a", "b"]);
    let before = pids(&root.status());
    let sup = root.supervisor_pid().unwrap();
    signal(sup, SIGSTOP);
    // The freeze itself (an action, not a wait for a condition): three heartbeat timeouts.
    std::thread::sleep(Duration::from_secs(3));
    signal(sup, SIGCONT);
    assert!(
        wait_until(T, || root
            .master_log()
            .contains("the supervisor did not run for")),
        "{}",
        root.master_log()
    );
    // Two more heartbeat timeouts under way: the daemons keep their processes.
    let calm = wait_until(Duration::from_secs(2), || pids(&root.status()) != before);
    assert!(!calm, "{}", root.master_log());
    let log = root.master_log();
    assert!(!log.contains("watchdog: no heartbeat"), "{log}");
    assert!(!log.contains("stalled:"), "{log}");
    for name in ["a", "b"] {
        assert_eq!(root.daemon(name).restarts, 0);
    }
}

#[test]
fn a_dependency_that_dies_before_it_is_ready_keeps_its_dependents_from_starting() {
    let root = Root::with_config(&config(&[
        plain("dep", "exit 1", "    max_restarts: 2\n"),
        plain("app", "exec sleep 1000", "    depends_on: [dep]\n"),
    ]));
    let out = root.run(&["start", "app"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("dep"), "{text}");
    assert!(text.contains("FAILED"), "{text}");
    let app = root.daemon("app");
    assert_eq!(app.state, DaemonState::Stopped, "{app:#?}");
    assert!(
        app.reason.as_deref().unwrap().contains("dependency dep"),
        "{app:#?}"
    );
    assert!(
        !root.master_log().contains("app: spawned"),
        "{}",
        root.master_log()
    );
    assert_eq!(root.state("dep"), DaemonState::Failed);
}

#[test]
fn every_ready_form_holds_before_dependents_start() {
    let (tcp, http) = (free_port(), free_port());
    let root = Root::with_config(&config(&[
        plain(
            "tcp_dep",
            &format!(
                "sleep 0.3; exec python3 -c 'import socket,time; s=socket.socket(); s.bind((\"127.0.0.1\",{tcp})); s.listen(); time.sleep(1000)'"
            ),
            &format!("    ready:\n      tcp: \"127.0.0.1:{tcp}\"\n      interval: 100ms\n"),
        ),
        plain(
            "http_dep",
            &format!("sleep 0.3; exec python3 -m http.server {http} --bind 127.0.0.1"),
            &format!("    ready:\n      http: \"http://127.0.0.1:{http}/\"\n"),
        ),
        plain(
            "log_dep",
            "sleep 0.3; echo 'server listening now'; exec sleep 1000",
            "    ready:\n      log: \"listening\"\n",
        ),
        plain(
            "cmd_dep",
            "sleep 0.3; touch ready.flag; exec sleep 1000",
            "    ready:\n      command: [\"test\", \"-e\", \"ready.flag\"]\n",
        ),
        plain(
            "after_dep",
            "exec sleep 1000",
            "    ready:\n      after: 1s\n",
        ),
        plain(
            "app",
            "exec sleep 1000",
            "    depends_on: [tcp_dep, http_dep, log_dep, cmd_dep, after_dep]\n",
        ),
    ]));
    root.ok(&["start", "after_dep", "--no-wait"]);
    let d = root.wait_state("after_dep", DaemonState::Initializing, T);
    assert_eq!(
        d.reason.as_deref(),
        Some("waiting until ready: alive for 1s"),
        "{d:#?}"
    );
    let out = root.ok(&["start", "app"]);
    assert!(out.contains("RUNNING"), "{out}");
    let log = root.master_log();
    let app = line_of(&log, "app: spawned");
    for (dep, what) in [
        ("tcp_dep", format!("tcp 127.0.0.1:{tcp} accepting")),
        ("http_dep", "answering 2xx".to_string()),
        ("log_dep", "a log line containing \"listening\"".to_string()),
        ("cmd_dep", "`test -e ready.flag` exiting 0".to_string()),
        ("after_dep", "alive for 1s".to_string()),
    ] {
        let ready = line_of(&log, &format!("{dep}: ready ("));
        assert!(log.lines().nth(ready).unwrap().contains(&what), "{log}");
        assert!(ready < app, "{dep} is ready before app spawns:\n{log}");
    }
}

#[test]
fn reload_applies_policy_in_place_and_restarts_only_for_process_changes() {
    let base = |policy: &str, env: &str, train: &str| {
        format!(
            "daemons:\n{}{}pipeline:\n  jobs:\n    train:\n      command: [\"{train}\", \"{{candidate_path}}\"]\n",
            fault("w", &[], &format!("    heartbeat_timeout: 5\n{policy}")),
            plain("p", "exec sleep 1000", &format!("{policy}{env}")),
        )
    };
    let policy =
        "    restart: on_failure\n    grace_period: 3\n    max_restarts: 9\n    backoff_max: 5\n";
    let root = Root::with_config(&base("", "", "true"));
    root.ok(&["start", "w", "p"]);
    let before = pids(&root.status());
    // The policy, then a job template: no daemon restarts.
    for (train, says) in [
        ("true", "applied in place"),
        ("false", "job templates changed"),
    ] {
        root.write_config(&base(policy, "", train));
        let out = root.ok(&["reload"]);
        assert!(out.contains(says), "{out}");
        assert_eq!(pids(&root.status()), before, "{out}");
    }
    // The environment changes the process: that one restarts.
    root.write_config(&base(policy, "    env:\n      X: \"changed\"\n", "false"));
    let out = root.ok(&["reload"]);
    assert!(out.contains("changed env: restarting"), "{out}");
    assert!(
        wait_until(T, || root.pid("p").is_some_and(|p| p != before["p"])
            && root.state("p") == DaemonState::Running),
        "{}",
        root.master_log()
    );
    assert_eq!(root.pid("w"), Some(before["w"]));
}

/// Starts a command without waiting for it.
trait OutputAsync {
    fn output_async(&mut self) -> std::process::Child;
}

impl OutputAsync for std::process::Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the CLI")
    }
}

#[test]
fn a_reload_of_the_ready_condition_says_it_applies_from_the_next_start() {
    let entry = |after: &str| {
        config(&[plain(
            "p",
            "exec sleep 1000",
            &format!("    ready:\n      after: {after}\n"),
        )])
    };
    let root = Root::with_config(&entry("200ms"));
    root.ok(&["start", "p"]);
    let pid = root.pid("p").unwrap();
    root.write_config(&entry("300ms"));
    let out = root.ok(&["reload"]);
    assert!(
        out.contains("changed ready: used from its next start"),
        "{out}"
    );
    assert_eq!(
        root.pid("p"),
        Some(pid),
        "no restart for a readiness change"
    );
    assert_eq!(root.state("p"), DaemonState::Running);
}
