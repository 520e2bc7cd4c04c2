//! Issue 2: start/stop/restart/pause, dependency order, status, logs, configuration errors,
//! IPC robustness — with the real binaries in temporary roots.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn start_all_runs_every_enabled_daemon_as_its_own_child_in_dependency_order() {
    let root = Root::new();
    let out = root.ok(&["start", "--all"]);
    let status = root.status();
    let running = in_state(&status, DaemonState::Running);
    assert_eq!(running.len(), 13, "{out}\n{status:#?}");
    // The bus (`nats`) is off by default: no server is started, none is needed.
    for disabled in ["ephemeral_sync", "unified_idle_shutdown", "nats"] {
        assert!(!running.contains(&disabled.to_string()));
    }
    assert_eq!(daemon(&status, "nats").pid, None);
    let sup = status.supervisor.pid;
    let pids = pids(&status);
    let distinct: std::collections::BTreeSet<_> = pids.values().collect();
    assert_eq!(
        distinct.len(),
        pids.len(),
        "every daemon has its own process"
    );
    for (name, pid) in &pids {
        assert_eq!(
            ppid(*pid),
            Some(sup),
            "{name} (pid {pid}) is a child of the supervisor"
        );
        assert!(!pids.values().any(|p| p == &sup));
    }
    // Dependencies first: training_trigger is spawned only after its four sources are RUNNING.
    let log = root.master_log();
    let tt_spawn = line_of(&log, "training_trigger: spawned");
    for dep in [
        "auto_sync",
        "cluster_data_sync",
        "auto_export",
        "quality_monitor",
    ] {
        assert!(
            line_of(&log, &format!("{dep}: INITIALIZING → RUNNING")) < tt_spawn,
            "{dep} before training_trigger:\n{log}"
        );
    }
    assert!(
        line_of(&log, "training_trigger: INITIALIZING → RUNNING")
            < line_of(&log, "evaluation: spawned")
    );
    assert!(
        line_of(&log, "evaluation: INITIALIZING → RUNNING")
            < line_of(&log, "auto_promotion: spawned")
    );
}

#[test]
fn restart_pause_resume_stop_and_shutdown() {
    let root = Root::new();
    root.ok(&["start", "--all"]);
    let before = pids(&root.status());

    root.ok(&["restart", "auto_sync"]);
    let after = pids(&root.status());
    assert_ne!(
        after["auto_sync"], before["auto_sync"],
        "auto_sync has a new pid"
    );
    for (name, pid) in &before {
        if name != "auto_sync" {
            assert_eq!(after.get(name), Some(pid), "{name} kept its pid");
        }
    }
    assert!(
        !alive(before["auto_sync"]),
        "the old auto_sync process is gone"
    );

    root.ok(&["pause", "AUTO_SYNC"]);
    assert_eq!(root.state("auto_sync"), DaemonState::Paused);
    assert!(alive(after["auto_sync"]), "a paused daemon stays alive");
    root.ok(&["resume", "auto_sync"]);
    assert_eq!(root.state("auto_sync"), DaemonState::Running);

    let sup = root.supervisor_pid().unwrap();
    let out = root.ok(&["stop", "--all"]);
    let status = root.status();
    assert_eq!(
        in_state(&status, DaemonState::Stopped).len(),
        16,
        "the catalog's fifteen and nats: {out}"
    );
    // Dependents stop first.
    let log = root.master_log();
    assert!(
        line_of(&log, "auto_promotion: SHUTTING_DOWN → STOPPED")
            < line_of(&log, "evaluation: RUNNING → SHUTTING_DOWN")
    );
    assert!(
        line_of(&log, "training_trigger: SHUTTING_DOWN → STOPPED")
            < last_line_of(&log, "auto_sync: RUNNING → SHUTTING_DOWN")
    );

    let out = root.ok(&["shutdown"]);
    assert!(out.contains("shut down"), "{out}");
    assert!(wait_until(T, || !alive(sup)), "the supervisor exits");
    for (name, pid) in after {
        assert!(!alive(pid), "{name} (pid {pid}) is gone");
    }
    let o = root.run(&["status"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "no supervisor any more: {}",
        stderr(&o)
    );
}

#[test]
fn stopping_a_dependency_stops_its_dependents_first() {
    let root = Root::new();
    root.ok(&["start", "evaluation"]);
    // Dependencies were pulled in: what evaluation depends on, directly or not (by the
    // depends_on lists status reports), and nothing else.
    let status = root.status();
    let mut needed = vec!["evaluation".to_string()];
    let mut next = 0;
    while let Some(name) = needed.get(next).cloned() {
        for dep in &daemon(&status, &name).depends_on {
            if !needed.contains(dep) {
                needed.push(dep.clone());
            }
        }
        next += 1;
    }
    needed.sort();
    let mut running = in_state(&status, DaemonState::Running);
    running.sort();
    assert_eq!(running, needed);
    assert_eq!(
        running.len(),
        6,
        "evaluation, training_trigger and its four sources"
    );
    assert_eq!(root.state("auto_promotion"), DaemonState::Stopped);
    root.ok(&["stop", "auto_sync"]);
    for n in ["auto_sync", "training_trigger", "evaluation"] {
        assert_eq!(root.state(n), DaemonState::Stopped, "{n}");
    }
    assert_eq!(
        root.state("cluster_data_sync"),
        DaemonState::Running,
        "unrelated daemons stay up"
    );
}

#[test]
fn daemon_output_reaches_its_log_with_timestamp_and_stream_within_a_second() {
    // An external program that prints its own clock: the log line's timestamp must be within a
    // second of it, i.e. the line was written to disk right away, not buffered.
    let root = Root::with_config(
        "daemons:\n  ticker:\n    command: [\"sh\", \"-c\", \"while true; do date -u +%s.%N; echo oops >&2; sleep 0.2; done\"]\n",
    );
    root.ok(&["start", "ticker"]);
    let path = root.log_path("ticker");
    let mut text = String::new();
    assert!(
        wait_until(T, || {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            text.lines().filter(|l| l.contains("[out]")).count() >= 3 && text.contains("[err] oops")
        }),
        "log:\n{text}"
    );
    for line in text.lines().filter(|l| l.contains("[out]")) {
        let (stamp, rest) = line.split_once(' ').unwrap();
        let written: f64 = rest.trim_start_matches("[out] ").trim().parse().unwrap();
        let logged = parse_rfc3339(stamp);
        assert!(
            (logged - written).abs() < 1.0,
            "logged at {logged}, written at {written}: {line}"
        );
    }
    // `logs` shows the same lines.
    let shown = root.ok(&["logs", "ticker", "-n", "2"]);
    assert_eq!(shown.lines().count(), 2, "{shown}");
    // `logs -f` keeps printing what the daemon writes next.
    let follower = root.follow(&["logs", "ticker", "-f", "-n", "0"]);
    let line = follower.lines.recv_timeout(T);
    drop(follower);
    let line = line.expect("logs -f printed a new line");
    assert!(line.contains("[out]") || line.contains("[err]"), "{line}");
}

fn parse_rfc3339(s: &str) -> f64 {
    // 2026-11-28T08:30:00.123Z
    let (date, time) = s.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (y, m, day) = (d[0], d[1], d[2]);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let t: Vec<f64> = time.split(':').map(|x| x.parse().unwrap()).collect();
    days as f64 * 86400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2]
}

#[test]
fn bad_configurations_are_refused_before_anything_starts() {
    let cases = [
        (
            "cycle",
            "daemons:\n  auto_sync:\n    depends_on: [auto_promotion]\n",
            "dependency cycle",
        ),
        (
            "unknown key",
            "daemons:\n  auto_sync:\n    intervall: 5\n",
            "daemons.auto_sync.intervall",
        ),
        (
            "broken yaml",
            "daemons:\n  auto_sync: [\n    enabled: true\n",
            "invalid YAML",
        ),
        (
            "out of range",
            "daemons:\n  auto_sync:\n    interval: -1\n",
            "daemons.auto_sync.interval",
        ),
        (
            "unknown daemon",
            "daemons:\n  auto_synk:\n    enabled: true\n",
            "did you mean auto_sync",
        ),
        // A name is a file name (logs/<name>.log): one that climbs out of the root is refused.
        (
            "path as a name",
            "daemons:\n  \"../../escaped_rr\":\n    command: [\"sleep\", \"100\"]\n",
            "is not a lower-case identifier",
        ),
        (
            "reserved name",
            "daemons:\n  master_loop:\n    command: [\"sleep\", \"100\"]\n",
            "reserved for the supervisor",
        ),
        // A damaged file must not pass as "the default configuration".
        ("NUL bytes", &"\0".repeat(4096), "byte 0x00 is not text"),
        ("empty file", "", "holds no YAML mapping"),
    ];
    for (what, yaml, needle) in cases {
        let root = Root::with_config(yaml);
        for args in [&["start", "--all"][..], &["config", "check"][..]] {
            let out = root.run(args);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{what}: {args:?} exit code; stderr: {}",
                stderr(&out)
            );
            let err = stderr(&out);
            assert!(
                err.contains(needle),
                "{what}: message names the problem: {err}"
            );
            assert!(
                err.contains("config/unified_loop.yaml"),
                "{what}: message names the file: {err}"
            );
        }
        assert!(
            !root.path().join("run/supervisor.sock").exists(),
            "{what}: nothing was started"
        );
        assert!(root.supervisor_pid().is_none());
        assert!(
            !root.path().join("../escaped_rr.log").exists(),
            "{what}: no log was written outside logs/"
        );
    }
    // The line is named where there is one.
    let root = Root::with_config("daemons:\n  auto_sync:\n    enabled: true\n    intervall: 5\n");
    let err = stderr(&root.run(&["config", "check"]));
    assert!(
        err.contains("unified_loop.yaml:4: daemons.auto_sync.intervall"),
        "{err}"
    );
}

#[test]
fn environment_overrides_apply_and_are_validated() {
    let root = Root::new();
    let out = root
        .cmd(&["config", "check"])
        .env("RINGRIFT_DAEMONS__AUTO_SYNC__GRACE_PERIOD", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("RINGRIFT_DAEMONS__AUTO_SYNC__GRACE_PERIOD"),
        "{}",
        stderr(&out)
    );
    let out = root
        .cmd(&["config", "check"])
        .env("RINGRIFT_DAEMONS__EPHEMERAL_SYNC__ENABLED", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains("14 enabled"), "{}", stdout(&out));
}

#[test]
fn mistakes_get_clear_errors() {
    let root = Root::new();
    let o = root.run(&["status"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("no supervisor is running"),
        "{}",
        stderr(&o)
    );

    root.ok(&["start", "auto_sync"]);
    let o = root.run(&["restart", "auto_synk"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stdout(&o).contains("did you mean auto_sync"),
        "{}",
        stdout(&o)
    );
    let o = root.run(&["start", "--profile", "fulll"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("did you mean full"), "{}", stderr(&o));
    let o = root.run(&["logs", "trainig_trigger"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("training_trigger"), "{}", stderr(&o));

    // A second supervisor on the same root is refused.
    let o = root.run(&["serve"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));
    let o = root.run(&["start", "--foreground", "auto_sync"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));
    assert_eq!(
        root.state("auto_sync"),
        DaemonState::Running,
        "the first one is unharmed"
    );
}

#[test]
fn stale_socket_and_pid_file_are_cleaned_up() {
    let root = Root::new();
    let run = root.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    // A dead supervisor's leftovers: a socket nobody listens on, and a pid file.
    drop(std::os::unix::net::UnixListener::bind(run.join("supervisor.sock")).unwrap());
    std::fs::write(run.join("supervisor.pid"), "999999\n").unwrap();
    root.ok(&["start", "auto_sync"]);
    assert_eq!(root.state("auto_sync"), DaemonState::Running);
    let pid = root.supervisor_pid().unwrap();
    assert!(alive(pid) && pid != 999_999);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&run.join("supervisor.sock")), 0o600);
}

fn connect(root: &Root) -> (BufReader<UnixStream>, UnixStream) {
    let s = UnixStream::connect(root.path().join("run/supervisor.sock")).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}

fn read_json(r: &mut BufReader<UnixStream>) -> serde_json::Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn bad_frames_get_typed_errors_and_the_supervisor_keeps_running() {
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);

    // Protocol mismatch.
    let (mut r, mut w) = connect(&root);
    w.write_all(b"{\"type\":\"hello\",\"protocol\":999,\"role\":\"cli\"}\n")
        .unwrap();
    let v = read_json(&mut r);
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], "protocol_mismatch");

    // Garbage before hello.
    let (mut r, mut w) = connect(&root);
    w.write_all(b"hello there\n").unwrap();
    assert_eq!(read_json(&mut r)["code"], "bad_frame");

    // After a good hello: malformed, unknown type, oversized; the connection stays usable.
    let (mut r, mut w) = connect(&root);
    w.write_all(b"{\"type\":\"hello\",\"protocol\":1,\"role\":\"cli\"}\n")
        .unwrap();
    assert_eq!(read_json(&mut r)["type"], "welcome");
    w.write_all(b"{not json\n").unwrap();
    assert_eq!(read_json(&mut r)["code"], "bad_frame");
    w.write_all(b"{\"type\":\"explode\"}\n").unwrap();
    assert_eq!(read_json(&mut r)["code"], "bad_frame");
    let big = vec![b'x'; 2 * 1024 * 1024];
    w.write_all(&big).unwrap();
    w.write_all(b"\n").unwrap();
    assert_eq!(read_json(&mut r)["code"], "frame_too_large");
    w.write_all(b"{\"type\":\"status\",\"name\":\"auto_sync\"}\n")
        .unwrap();
    let v = read_json(&mut r);
    assert_eq!(v["type"], "status");
    let d: DaemonStatus = serde_json::from_value(v["daemons"][0].clone()).unwrap();
    assert_eq!(d.state, DaemonState::Running);

    // A stranger claiming to be a worker is refused.
    let (mut r, mut w) = connect(&root);
    w.write_all(b"{\"type\":\"hello\",\"protocol\":1,\"role\":\"worker\",\"daemon\":\"auto_sync\",\"pid\":1}\n").unwrap();
    assert_eq!(read_json(&mut r)["type"], "error");

    assert_eq!(root.state("auto_sync"), DaemonState::Running);
    // Bad frames are logged.
    root.assert_logged("malformed frame");
}

#[test]
fn external_program_is_supervised_as_a_plain_process() {
    let root = Root::with_config(
        "daemons:\n  sleeper:\n    command: [\"sleep\", \"1000\"]\n    grace_period: 5\n",
    );
    root.ok(&["start", "sleeper"]);
    let d = root.daemon("sleeper");
    assert_eq!(d.state, DaemonState::Running);
    assert_eq!(d.kind, "external");
    let pid = d.pid.unwrap();
    // Paused: frozen by its cgroup (cgroup.freeze) where the supervisor has cgroups, else SIGSTOP.
    let sup = root.status().supervisor;
    let frozen = || -> bool {
        if sup.containment.as_deref() == Some("cgroup") {
            let events = std::path::Path::new(sup.containment_detail.as_deref().unwrap())
                .join("daemon-sleeper/cgroup.events");
            std::fs::read_to_string(events).is_ok_and(|t| t.lines().any(|l| l == "frozen 1"))
        } else {
            proc_state(pid) == Some('T')
        }
    };
    root.ok(&["pause", "sleeper"]);
    assert!(wait_until(T, frozen), "paused: frozen or SIGSTOP");
    root.ok(&["resume", "sleeper"]);
    assert!(wait_until(T, || !frozen()), "resumed: thawed or SIGCONT");
    root.ok(&["stop", "sleeper"]);
    assert!(wait_until(T, || !alive(pid)));
}

#[test]
fn profiles_start_their_members_and_status_json_has_the_documented_fields() {
    let root = Root::new();
    root.ok(&["start", "--profile", "minimal"]);
    let status = root.status();
    let mut running = in_state(&status, DaemonState::Running);
    running.sort();
    assert_eq!(running, ["auto_sync", "job_reaper", "unified_node_health"]);
    // The documented fields are those of the library's types, which `status()` insists the JSON
    // has, no more and no fewer; here their values make sense.
    let sup = &status.supervisor;
    assert_eq!(Some(sup.pid), root.supervisor_pid());
    assert_eq!(std::path::Path::new(&sup.root), root.path());
    assert!(
        sup.uptime_secs >= 0.0 && !sup.version.is_empty(),
        "{sup:#?}"
    );
    assert_eq!(
        sup.config_path, "<embedded default>",
        "no config file in this root"
    );
    let d = daemon(&status, "auto_sync");
    assert!(d.enabled && d.kind == "worker", "{d:#?}");
    assert!(d.pid.is_some() && d.uptime_secs.is_some(), "{d:#?}");
    assert_eq!((d.restarts, d.last_exit.as_deref()), (0, None), "{d:#?}");
    assert!(d.depends_on.is_empty(), "{d:#?}");
    // A real health message: auto_sync with no targets says it has nothing to push.
    root.wait_health("auto_sync", T, |h| {
        h.message.contains("no targets configured")
    });
    let one = root.ok(&["status", "auto_sync"]);
    assert!(
        one.contains("auto_sync") && !one.contains("job_reaper"),
        "{one}"
    );
    let table = root.ok(&["status"]);
    assert!(
        table.contains("NAME") && table.contains("RESTARTS") && table.contains("HEALTH"),
        "{table}"
    );
}

#[test]
fn foreground_supervisor_stops_everything_in_reverse_order_on_ctrl_c() {
    let root = Root::new();
    let mut child = root
        .cmd(&["start", "--all", "--foreground"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(T, || root.path().join("run/supervisor.sock").exists()
            && root.run(&["status", "--json"]).status.success()
            && in_state(&root.status(), DaemonState::Running).len() == 13),
        "{}",
        root.master_log()
    );
    let daemons = pids(&root.status());
    signal(child.id(), SIGINT);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for (name, pid) in daemons {
        assert!(!alive(pid), "{name} stopped");
    }
    let log = root.master_log();
    assert!(
        line_of(&log, "auto_promotion: SHUTTING_DOWN → STOPPED")
            < line_of(&log, "evaluation: RUNNING → SHUTTING_DOWN"),
        "{log}"
    );
    assert!(
        line_of(&log, "evaluation: SHUTTING_DOWN → STOPPED")
            < line_of(&log, "training_trigger: RUNNING → SHUTTING_DOWN"),
        "{log}"
    );
}

#[test]
fn a_start_that_takes_too_long_times_out_with_a_clear_message() {
    // A "protocol" daemon that never says hello stays INITIALIZING until its ready timeout.
    let root = Root::with_config(
        "daemons:\n  silent:\n    command: [\"sleep\", \"100\"]\n    protocol: true\n    ready_timeout: 60\n",
    );
    let out = root.run(&["start", "silent", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no answer from the supervisor within 1s"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        root.state("silent"),
        DaemonState::Initializing,
        "the supervisor is unharmed and still waiting"
    );
}

#[test]
fn a_deleted_run_dir_is_made_again_and_never_lets_a_second_supervisor_in() {
    let root = Root::with_config("daemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n");
    root.ok(&["start", "napper"]);
    let first = root.supervisor_pid().unwrap();
    root.ok(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        r#"{"config_key":"hex8_2p","new_games":1}"#,
    ]);
    std::fs::remove_dir_all(root.path().join("run")).unwrap();

    // `start` right away: it must end up talking to the first supervisor, not run a second one.
    root.ok(&["start", "--all"]);
    assert!(
        wait_until(T, || root.supervisor_pid() == Some(first)),
        "run/supervisor.pid is written again by the supervisor that owns the root"
    );
    assert_eq!(root.status().supervisor.pid, first);
    assert_eq!(root.state("napper"), DaemonState::Running);
    root.assert_logged("making it again");
    // A second supervisor is refused by the lock on the root directory, run/ or not, and names the holder.
    let o = root.run(&["serve"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("another supervisor (pid {first})")),
        "{}",
        stderr(&o)
    );
    // One sequence: nothing emitted twice under the same number.
    root.ok(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        r#"{"config_key":"hex8_2p","new_games":2}"#,
    ]);
    let seqs: Vec<u64> = root.events(&[]).iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The refused second supervisor did not take the first one's socket with it.
    assert!(root.path().join("run/supervisor.sock").exists());
    assert_eq!(root.state("napper"), DaemonState::Running);
}

#[test]
fn nothing_outside_the_tree_can_act_as_a_daemon() {
    let root = Root::with_config(
        "daemons:\n  plain:\n    command: [\"sleep\", \"1000\"]\n  auto_sync:\n    interval: 0.2\n",
    );
    root.ok(&["start", "plain", "auto_sync"]);
    let plain_pid = root.pid("plain").unwrap();
    let sync_pid = root.pid("auto_sync").unwrap();
    // Claiming a daemon's name and its real pid on the control socket proves nothing: refused,
    // for a plain program (which never speaks the protocol) and a worker alike.
    for (daemon, pid) in [("plain", plain_pid), ("auto_sync", sync_pid)] {
        let (mut r, mut w) = connect(&root);
        w.write_all(
            format!("{{\"type\":\"hello\",\"protocol\":1,\"role\":\"worker\",\"daemon\":\"{daemon}\",\"pid\":{pid}}}\n")
                .as_bytes(),
        )
        .unwrap();
        let v = read_json(&mut r);
        assert_eq!(v["code"], "forbidden", "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("RINGRIFT_SUPERVISOR_FD"),
            "{v}"
        );
    }
    // The real worker keeps its connection: it goes on heartbeating.
    let before = root.daemon("auto_sync").heartbeat_age_secs;
    assert!(before.is_some());
    assert!(wait_until(T, || {
        root.daemon("auto_sync")
            .heartbeat_age_secs
            .is_some_and(|a| a < 1.0)
    }));
    assert_eq!(root.pid("auto_sync"), Some(sync_pid));
    // Only a protocol-speaking daemon is handed a connection.
    let told = |pid: u32| {
        procfs::environ(pid)
            .expect("/proc/<pid>/environ")
            .iter()
            .any(|(k, _)| k == "RINGRIFT_SUPERVISOR_FD")
    };
    assert!(told(sync_pid), "a worker is told its descriptor");
    assert!(!told(plain_pid), "a plain program gets no connection");
}

#[test]
fn another_user_cannot_reach_the_control_socket() {
    if !is_root() {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    }
    let root = Root::new();
    root.ok(&["start", "auto_sync"]);
    // Even with the root directory open to everyone, run/ (0700) keeps others out.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = root.path().join("run/supervisor.sock");
    let o = as_nobody(
        SUPERVISOR,
        &["--root", root.path().to_str().unwrap(), "stop", "auto_sync"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("cannot connect to {}", sock.display()))
            && stderr(&o).contains("Permission denied"),
        "{}",
        stderr(&o)
    );
    assert_eq!(root.state("auto_sync"), DaemonState::Running);
}

#[test]
fn a_client_that_never_reads_is_cut_off_and_connections_are_capped() {
    let root = Root::with_config("daemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n");
    root.ok(&["start", "napper"]);
    let sup = root.supervisor_pid().unwrap();
    // Warm up: a few status calls allocate what status needs.
    for _ in 0..5 {
        root.status();
    }
    let before = rss_kib(sup);

    // 30,000 status requests, replies never read: the supervisor stops queueing at its bound.
    let (_r, mut w) = connect(&root);
    w.write_all(b"{\"type\":\"hello\",\"protocol\":1,\"role\":\"cli\"}\n")
        .unwrap();
    w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = b"{\"type\":\"status\"}\n".repeat(1000);
    for _ in 0..30 {
        if w.write_all(&request).is_err() {
            break; // cut off: that is the point
        }
    }
    assert!(
        wait_until(T, || root.master_log().contains("replies unread")),
        "the reader-less client is disconnected and logged:\n{}",
        root.master_log()
    );
    let started = std::time::Instant::now();
    root.status();
    assert!(started.elapsed() < Duration::from_secs(5), "status answers");
    let after = rss_kib(sup);
    eprintln!("supervisor RSS: {before} KiB before, {after} KiB after the unread replies");
    assert!(
        after < before + 8 * 1024,
        "RSS {before} KiB → {after} KiB: the queue is bounded"
    );

    // Beyond the cap, connections are refused at once; supervision goes on meanwhile.
    let napper = root.pid("napper").unwrap();
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..300 {
        let (mut r, mut w) = connect(&root);
        // At the cap the supervisor answers `busy` and closes at once, possibly before this
        // hello arrives (EPIPE): the answer is read all the same.
        let _ = w.write_all(b"{\"type\":\"hello\",\"protocol\":1,\"role\":\"cli\"}\n");
        let v = read_json(&mut r);
        if v["type"] == "error" {
            refused = Some(v);
            break;
        }
        held.push((r, w));
    }
    let refused = refused.expect("a connection beyond the cap is refused");
    assert_eq!(refused["code"], "busy", "{refused}");
    // 256 at most, less any of the earlier connections still being torn down.
    assert!((250..=256).contains(&held.len()), "{}", held.len());
    signal(napper, SIGKILL);
    drop(held);
    // The supervisor notices the closed connections shortly; until then `status` may be refused.
    assert!(wait_until(T, || {
        let out = root.run(&["status", "napper", "--json"]);
        if !out.status.success() {
            return false;
        }
        let d = &parse_status(&stdout(&out)).daemons[0];
        d.state == DaemonState::Running && d.pid.is_some_and(|p| p != napper)
    }));
}
