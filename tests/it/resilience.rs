//! Issue 3: restarts with backoff, the intensity limit, the watchdog, process-group stops, the
//! parent-death signal, leftovers of an earlier supervisor, SIGHUP reload and log floods — with the
//! fault-injection worker (`ringrift-worker fault`) as the misbehaving daemon.

use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// A daemon entry running the fault worker with these options.
fn fault(name: &str, opts: &str, extra: &str) -> String {
    let args: Vec<String> = opts
        .split_whitespace()
        .map(|a| format!("\"{a}\""))
        .collect();
    let sep = if args.is_empty() { "" } else { ", " };
    let timeout = if extra.contains("heartbeat_timeout") {
        ""
    } else {
        "    heartbeat_timeout: 2\n"
    };
    format!(
        "  {name}:\n    command: [\"{WORKER}\", \"fault\"{sep}{}]\n    protocol: true\n    heartbeat_interval: 0.1\n{timeout}{extra}",
        args.join(", ")
    )
}

fn config(entries: &[String]) -> String {
    format!(
        "defaults:\n  backoff_initial: 50ms\n  grace_period: 2\ndaemons:\n{}",
        entries.concat()
    )
}

fn restarts(root: &Root, name: &str) -> u32 {
    root.daemon(name).restarts
}

#[test]
fn a_killed_daemon_is_back_with_a_new_pid_in_well_under_a_second() {
    let root = Root::with_config(&config(&[
        fault("victim", "", ""),
        fault("bystander", "", ""),
    ]));
    root.ok(&["start", "victim", "bystander"]);
    let old = root.pid("victim").unwrap();
    let bystander = root.pid("bystander").unwrap();
    signal(old, SIGKILL);
    assert!(
        wait_until(T, || root.pid("victim").is_some_and(|p| p != old)
            && root.state("victim") == DaemonState::Running),
        "{}",
        root.master_log()
    );
    let d = root.daemon("victim");
    assert_eq!(d.restarts, 1);
    assert_eq!(d.last_exit.as_deref(), Some("killed by SIGKILL"));
    // The restart delay the supervisor chose (logged as "restart #1 in N ms").
    let log = root.master_log();
    let line = log
        .lines()
        .find(|l| l.contains("victim: killed by SIGKILL; restart #1 in"))
        .expect("restart logged");
    let ms: u64 = line
        .split(" in ")
        .last()
        .unwrap()
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms < 1000, "first restart delay {ms} ms");
    assert_eq!(
        root.pid("bystander"),
        Some(bystander),
        "other daemons are untouched"
    );
}

#[test]
fn a_crash_loop_backs_off_and_ends_failed_while_others_keep_heartbeating() {
    let root = Root::with_config(&config(&[
        fault(
            "crasher",
            "--exit-immediately",
            "    max_restarts: 4\n    restart_window: 60\n",
        ),
        fault("steady", "", ""),
    ]));
    root.ok(&["start", "steady"]);
    let steady = root.pid("steady").unwrap();
    let out = root.run(&["start", "crasher"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "start reports the failure: {}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("FAILED"), "{}", stdout(&out));
    let d = root.daemon("crasher");
    assert_eq!(d.state, DaemonState::Failed);
    let reason = d.reason.as_deref().unwrap();
    assert!(reason.contains("restarted 4 times"), "{reason}");
    assert!(
        root.ok(&["status"]).contains("restarted 4 times"),
        "the reason is in the table"
    );
    // The delays grow.
    let delays: Vec<u64> = root
        .master_log()
        .lines()
        .filter(|l| l.contains("crasher: exit 1; restart #"))
        .map(|l| {
            l.split(" in ")
                .last()
                .unwrap()
                .trim_end_matches(" ms")
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(delays.len(), 4, "{delays:?}");
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "backoff grows: {delays:?}"
    );
    // Undisturbed neighbour.
    let s = root.daemon("steady");
    assert_eq!(s.pid, Some(steady));
    assert_eq!(s.restarts, 0);
    assert!(s.heartbeat_age_secs.unwrap() < 1.0, "{s:#?}");
    // `start` clears FAILED (and it fails again, having the same fault).
    let out = root.run(&["start", "crasher"]);
    assert!(
        root.master_log().contains("crasher: FAILED → WAITING"),
        "{}",
        stdout(&out)
    );
}

/// A daemon with this fault is killed by the supervisor and restarted, with `cause` in its status
/// and in the supervisor's log.
fn killed_and_restarted(name: &str, fault_opts: &str, extra: &str, cause: &str) {
    let root = Root::with_config(&config(&[fault(name, fault_opts, extra)]));
    root.ok(&["start", name]);
    assert!(
        wait_until(T, || restarts(&root, name) >= 1),
        "{}",
        root.master_log()
    );
    let d = root.daemon(name);
    assert!(d.reason.as_deref().unwrap_or("").contains(cause), "{d:#?}");
    root.assert_logged(&format!("{name}: {cause}"));
}

#[test]
fn a_hung_daemon_is_killed_by_the_watchdog_and_restarted() {
    killed_and_restarted(
        "hung",
        "--hang",
        "    heartbeat_timeout: 0.5\n",
        "watchdog: no heartbeat",
    );
}

#[test]
fn a_stalled_daemon_is_killed_and_restarted() {
    killed_and_restarted(
        "stuck",
        "--no-progress",
        "    stall_timeout: 0.6\n",
        "stalled: progress flat",
    );
}

#[test]
fn a_daemon_ignoring_sigterm_is_killed_after_its_grace_and_its_grandchild_goes_too() {
    let root = Root::with_config(&config(&[fault(
        "stubborn",
        "--ignore-sigterm --grandchild",
        "    grace_period: 0.5\n",
    )]));
    root.ok(&["start", "stubborn"]);
    let pid = root.pid("stubborn").unwrap();
    let grandchild = grandchild_of(&root, "stubborn");
    assert!(alive(grandchild));
    let began = Instant::now();
    root.ok(&["stop", "stubborn"]);
    assert!(
        began.elapsed() >= Duration::from_millis(500),
        "it waited for the grace period"
    );
    assert!(!alive(pid), "the daemon is gone");
    assert!(!alive(grandchild), "its grandchild is gone");
    root.assert_logged("stubborn: still running after the");
}

/// The pid of the grandchild a `--grandchild` fault worker reports in its log.
fn grandchild_of(root: &Root, name: &str) -> u32 {
    let mut pid = None;
    assert!(wait_until(T, || {
        let text = std::fs::read_to_string(root.log_path(name)).unwrap_or_default();
        pid = text
            .lines()
            .find_map(|l| l.split("grandchild pid ").nth(1))
            .and_then(|p| p.trim().parse::<u32>().ok());
        pid.is_some()
    }));
    pid.unwrap()
}

/// Worker processes of this root, by daemon name, found by scanning /proc.
fn tree_workers(root: &Root) -> Vec<(String, u32)> {
    let marker = root.path().display().to_string();
    let mut out = Vec::new();
    for pid in procfs::pids() {
        if !alive(pid) {
            continue;
        }
        let env = procfs::environ(pid).unwrap_or_default();
        if !env
            .iter()
            .any(|(k, v)| k == "RINGRIFT_ROOT" && *v == marker)
        {
            continue;
        }
        let args = procfs::argv(pid).unwrap_or_default();
        // Daemons only: `ringrift-worker <daemon>`, not the jobs they run (`ringrift-worker job ...`).
        if args.first().is_some_and(|a| a.ends_with("ringrift-worker"))
            && args.get(1).is_some_and(|a| a != "job")
        {
            out.push((args.get(1).cloned().unwrap_or_default(), pid));
        }
    }
    out
}

#[test]
fn a_killed_supervisor_takes_its_workers_along_and_the_next_one_runs_one_of_each() {
    let root = Root::new();
    root.ok(&["start", "--all"]);
    let sup = root.supervisor_pid().unwrap();
    let workers = pids(&root.status());
    signal(sup, SIGKILL);
    assert!(
        wait_until(Duration::from_secs(2), || workers
            .values()
            .all(|p| !alive(*p))),
        "workers outlived the supervisor: {:?}",
        workers
            .iter()
            .filter(|(_, p)| alive(**p))
            .collect::<Vec<_>>()
    );
    root.ok(&["start", "--all"]);
    let again = tree_workers(&root);
    let mut names: Vec<&str> = again.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(
        names, unique,
        "exactly one instance of each daemon: {again:?}"
    );
    assert_eq!(names.len(), 13);
}

#[test]
fn processes_left_by_an_earlier_supervisor_are_stopped_before_anything_starts() {
    let root = Root::with_config(&config(&[fault("parent", "--grandchild", "")]));
    root.ok(&["start", "parent"]);
    let grandchild = grandchild_of(&root, "parent");
    let sup = root.supervisor_pid().unwrap();
    signal(sup, SIGKILL);
    // The worker dies with the supervisor (parent-death signal); its grandchild does not.
    assert!(wait_until(T, || !alive(sup)));
    assert!(
        alive(grandchild),
        "the grandchild survived the supervisor (it has no parent-death signal)"
    );
    root.ok(&["start", "parent"]);
    assert!(
        !alive(grandchild),
        "the new supervisor stopped the leftover"
    );
    root.assert_logged("left by an earlier supervisor");
}

#[test]
fn sighup_restarts_only_the_daemon_whose_configuration_changed() {
    let yaml = config(&[
        fault("alpha", "", "    interval: 5\n"),
        fault("beta", "", "    interval: 5\n"),
    ]);
    let root = Root::with_config(&yaml);
    root.ok(&["start", "alpha", "beta"]);
    let (alpha, beta) = (root.pid("alpha").unwrap(), root.pid("beta").unwrap());
    root.write_config(&config(&[
        fault("alpha", "", "    interval: 7\n"),
        fault("beta", "", "    interval: 5\n"),
    ]));
    signal(root.supervisor_pid().unwrap(), SIGHUP);
    assert!(
        wait_until(T, || root.pid("alpha").is_some_and(|p| p != alpha)
            && root.state("alpha") == DaemonState::Running),
        "{}",
        root.master_log()
    );
    assert_eq!(root.pid("beta"), Some(beta), "beta kept its pid");
    // `reload` does the same, and a broken file is refused without touching anything.
    root.write_config("daemons: [oops\n");
    let out = root.run(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(root.pid("beta"), Some(beta));
    root.write_config(&config(&[
        fault("alpha", "", "    interval: 7\n"),
        fault("beta", "", "    interval: 9\n"),
    ]));
    let out = root.ok(&["reload"]);
    assert!(out.contains("beta") && out.contains("restarting"), "{out}");
    assert!(wait_until(T, || root
        .pid("beta")
        .is_some_and(|p| p != beta)
        && root.state("beta") == DaemonState::Running));
    // An added daemon is started, a removed one stopped; the others keep their pids.
    let alpha = root.pid("alpha").unwrap();
    let beta = root.pid("beta").unwrap();
    root.write_config(&config(&[
        fault("alpha", "", "    interval: 7\n"),
        fault("gamma", "", ""),
    ]));
    let out = root.ok(&["reload"]);
    assert!(out.contains("gamma") && out.contains("added"), "{out}");
    assert!(out.contains("beta") && out.contains("removed"), "{out}");
    root.wait_state("gamma", DaemonState::Running, T);
    assert!(
        wait_until(T, || !alive(beta)),
        "the removed daemon's process is gone"
    );
    assert_eq!(root.pid("alpha"), Some(alpha), "alpha kept its pid");
}

#[test]
fn a_million_flooded_lines_all_reach_the_rotated_logs_while_heartbeats_stay_on_time() {
    let yaml = format!(
        "logs:\n  max_bytes: 20000000\n  max_files: 12\n{}",
        config(&[
            fault("flooder", "--flood 1000000", "    ready_timeout: 120\n"),
            fault("steady", "", "    heartbeat_timeout: 1\n")
        ])
    );
    let root = Root::with_config(&yaml);
    root.ok(&["start", "steady"]);
    let steady = root.pid("steady").unwrap();
    root.ok(&["start", "flooder", "--no-wait"]);
    let logs = || -> Vec<std::path::PathBuf> {
        let mut v = vec![root.log_path("flooder")];
        v.extend((1..12).map(|i| root.path().join(format!("logs/flooder.log.{i}"))));
        v.into_iter().filter(|p| p.exists()).collect()
    };
    let mut worst_age = 0.0f64;
    let done = wait_until(Duration::from_secs(120), || {
        let s = root.daemon("steady");
        worst_age = worst_age.max(s.heartbeat_age_secs.unwrap_or(0.0));
        std::fs::read_to_string(root.log_path("flooder")).is_ok_and(|t| t.contains("flood done"))
    });
    assert!(done, "the flood finished");
    let mut seen = vec![false; 1_000_001];
    let mut count = 0usize;
    for path in logs() {
        let text = std::fs::read(&path).unwrap();
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let line = String::from_utf8_lossy(line);
            if let Some(n) = line
                .split("[out] line ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.trim_end_matches('x').parse::<usize>().ok())
            {
                seen[n] = true;
                count += 1;
            }
        }
    }
    assert!(logs().len() > 1, "the log rotated");
    let missing: Vec<usize> = (1..=1_000_000).filter(|&i| !seen[i]).take(5).collect();
    assert!(
        missing.is_empty(),
        "lost lines, e.g. {missing:?} ({count} seen)"
    );
    assert_eq!(count, 1_000_000);
    let s = root.daemon("steady");
    assert_eq!(s.restarts, 0, "steady was never killed by its 1 s watchdog");
    assert_eq!(s.pid, Some(steady));
    assert!(
        worst_age < 1.0,
        "heartbeat age reached {worst_age}s during the flood"
    );
}
