//! Issue 3: jobs owned by the supervisor, JOB_REAPER (the `reap` command and the daemon), and the
//! second-Ctrl-C escalation.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

fn jobber(job: &str, max_runtime: &str, extra: &str) -> String {
    format!(
        "defaults:\n  heartbeat_interval: 0.2\ndaemons:\n  jobber:\n    command: [\"{WORKER}\", \"fault\", \"--job\", \"{job}\", \"--job-max-runtime\", \"{max_runtime}\"]\n    protocol: true\n{extra}"
    )
}

/// A process this test starts and must clean up, whatever happens.
struct Planted(Child);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn plant(env: &[(&str, &str)]) -> Planted {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("sleep");
    c.arg("1000")
        .env_remove("RINGRIFT_ROOT")
        .env_remove("RINGRIFT_SUPERVISOR_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    Planted(c.spawn().unwrap())
}

#[test]
fn a_job_runs_in_its_own_group_logs_its_output_and_its_exit_reaches_the_daemon() {
    let root = Root::with_config(&jobber(
        "echo hello from the job; sleep 1; exit 3",
        "30",
        "",
    ));
    root.ok(&["start", "jobber"]);
    let mut status = None;
    assert!(wait_until(T, || {
        let s = root.status();
        let running = !s.jobs.is_empty();
        status = Some(s);
        running
    }));
    let status = status.unwrap();
    let job = &status.jobs[0];
    let table = root.ok(&["status"]);
    assert!(
        table.contains(&format!("job {}", job.id)),
        "the table lists running jobs:\n{table}"
    );
    assert_eq!(job.daemon, "jobber");
    assert_eq!(
        ppid(job.pid),
        Some(status.supervisor.pid),
        "the supervisor owns the job"
    );
    let id = &job.id;
    let text = root.wait_log("jobber", &format!("job {id} ended"), T);
    assert!(text.contains("exit 3; timed out: false"), "{text}");
    let job_log = std::fs::read_to_string(root.path().join(format!("logs/jobs/{id}.log"))).unwrap();
    assert!(job_log.contains("[out] hello from the job"), "{job_log}");
    assert!(
        root.status().jobs.is_empty(),
        "finished jobs leave the list"
    );
}

#[test]
fn a_job_past_its_maximum_runtime_is_stopped() {
    let root = Root::with_config(&jobber("sleep 100", "0.3", ""));
    root.ok(&["start", "jobber"]);
    root.wait_log("jobber", "timed out: true", T);
    root.assert_logged("over its max runtime");
}

#[test]
fn reap_lists_then_kills_an_overdue_job_and_a_planted_orphan_but_nothing_outside_the_tree() {
    // The job ignores SIGTERM and its daemon's grace is long, so it stays overdue until reaped.
    let root = Root::with_config(&format!(
        "{}    grace_period: 600\n  job_reaper:\n    reap_grace: 0.5\n",
        jobber("trap '' TERM; sleep 1000", "0.3", "")
    ));
    root.ok(&["start", "jobber"]);
    let root_text = root.path().display().to_string();
    let orphan = plant(&[
        ("RINGRIFT_ROOT", &root_text),
        ("RINGRIFT_SUPERVISOR_PID", "999999"),
    ]);
    let outsider = plant(&[]);
    let lookalike = plant(&[("RINGRIFT_ROOT", &root_text)]);
    let (orphan_pid, outsider_pid, lookalike_pid) =
        (orphan.0.id(), outsider.0.id(), lookalike.0.id());

    let mut dry = String::new();
    assert!(
        wait_until(T, || {
            dry = root.ok(&["reap", "--dry-run"]);
            dry.contains("overdue")
        }),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("would kill pid {orphan_pid}"))
            && dry.contains("orphan of an earlier supervisor (pid 999999)"),
        "{dry}"
    );
    assert!(
        !dry.contains(&outsider_pid.to_string()) && !dry.contains(&format!("pid {lookalike_pid}")),
        "{dry}"
    );
    let job_pid = root.status().jobs[0].pid;
    assert!(
        alive(orphan_pid) && alive(job_pid),
        "a dry run kills nothing"
    );

    let out = root.ok(&["reap"]);
    assert!(out.contains(&format!("killed pid {orphan_pid}")), "{out}");
    assert!(out.contains(&format!("killed pid {job_pid}")), "{out}");
    assert!(wait_until(T, || !alive(orphan_pid) && !alive(job_pid)));
    assert!(
        alive(outsider_pid) && alive(lookalike_pid),
        "processes outside the tree are untouched"
    );
    assert_eq!(
        root.state("jobber"),
        DaemonState::Running,
        "the daemon itself is left alone"
    );
    // The daemon hears its job ended.
    root.wait_log("jobber", "ended", T);
}

#[test]
fn the_job_reaper_daemon_kills_orphans_every_cycle() {
    let root = Root::with_config(
        "daemons:\n  job_reaper:\n    interval: 0.2\n    heartbeat_interval: 0.1\n    reap_grace: 0.5\n",
    );
    root.ok(&["start", "job_reaper"]);
    let root_text = root.path().display().to_string();
    let orphan = plant(&[
        ("RINGRIFT_ROOT", &root_text),
        ("RINGRIFT_SUPERVISOR_PID", "999999"),
    ]);
    let pid = orphan.0.id();
    root.wait_log("job_reaper", &format!("killed pid {pid}"), T);
    assert!(wait_until(T, || !alive(pid)));
    let d = root.wait_daemon("job_reaper", T, |d| {
        d.progress.get("killed").copied().unwrap_or(0) >= 1
    });
    assert!(d.health.message.starts_with("last pass"), "{d:#?}");
    // Each kill is published.
    let mut events = Vec::new();
    assert!(
        wait_until(T, || {
            events = root.events_of("JOB_REAPED");
            events.iter().any(|e| e.payload["pid"] == pid)
        }),
        "{events:#?}"
    );
    let reaped = events.iter().find(|e| e.payload["pid"] == pid).unwrap();
    assert!(
        reaped
            .payload
            .to_string()
            .contains("orphan of an earlier supervisor"),
        "{reaped:?}"
    );
}

#[test]
fn a_second_ctrl_c_kills_every_group_at_once() {
    let root = Root::with_config(&format!(
        "daemons:\n  stubborn:\n    command: [\"{WORKER}\", \"fault\", \"--ignore-sigterm\"]\n    protocol: true\n    grace_period: 600\n"
    ));
    let mut child = root
        .cmd(&["start", "stubborn", "--foreground"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(T, || root.run(&["status", "--json"]).status.success()
            && root.state("stubborn") == DaemonState::Running),
        "{}",
        root.master_log()
    );
    let pid = root.pid("stubborn").unwrap();
    signal(child.id(), SIGINT);
    root.wait_state("stubborn", DaemonState::ShuttingDown, T);
    signal(child.id(), SIGINT);
    assert!(
        wait_exit(&mut child, T).is_some(),
        "the supervisor exits without waiting out the 600 s grace period"
    );
    assert!(wait_until(T, || !alive(pid)), "the stubborn daemon is gone");
    root.assert_logged("second SIGINT");
}

#[test]
fn an_idle_node_runs_its_shutdown_command_once() {
    let marker = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let marker_path = marker.to_path_buf();
    drop(marker);
    let root = Root::with_config(&format!(
        "daemons:\n  unified_idle_shutdown:\n    enabled: true\n    interval: 0.2\n    heartbeat_interval: 0.1\n    idle_minutes: 0.005\n    cpu_threshold: 100\n    shutdown_command: [\"sh\", \"-c\", \"echo shut >> {}\"]\n",
        marker_path.display()
    ));
    root.ok(&["start", "unified_idle_shutdown"]);
    assert!(wait_until(T, || std::fs::read_to_string(&marker_path)
        .is_ok_and(|t| t.contains("shut"))));
    let d = root.wait_daemon("unified_idle_shutdown", T, |d| {
        d.health.message.starts_with("shutdown command ran")
    });
    // Once only, however many cycles follow.
    let cycles = |d: &DaemonStatus| d.progress.get("cycles").copied().unwrap_or(0);
    let fired_at = cycles(&d);
    assert!(wait_until(T, || cycles(
        &root.daemon("unified_idle_shutdown")
    ) >= fired_at + 3));
    assert_eq!(
        std::fs::read_to_string(&marker_path)
            .unwrap()
            .matches("shut")
            .count(),
        1
    );
    let _ = std::fs::remove_file(&marker_path);
}

/// Issue 14, bounded data: logs/jobs/ keeps the logs of at most `logs.job_logs_keep` ended jobs
/// (the newest), none older than `job_logs_max_age`.
#[test]
fn old_job_logs_are_pruned_to_the_configured_limits() {
    let root = Root::with_config(&jobber(
        "echo a line for the log",
        "30",
        "logs:\n  job_logs_keep: 3\n  job_logs_max_age: 1h\n",
    ));
    // A log from a job that ended two days ago, and a young one from a job that is gone.
    let jobs = root.path().join("logs/jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let ancient = jobs.join("old-1700000000-0001.log");
    std::fs::write(&ancient, "old\n").unwrap();
    let touched = Command::new("touch")
        .args(["-d", "2 days ago"])
        .arg(&ancient)
        .status()
        .unwrap();
    assert!(touched.success());
    let ended = || {
        std::fs::read_to_string(root.log_path("jobber"))
            .unwrap_or_default()
            .matches(" ended: ")
            .count()
    };
    root.ok(&["start", "jobber"]);
    for n in 1..=6 {
        assert!(wait_until(T, || ended() >= n), "job {n} did not end");
        if n < 6 {
            root.ok(&["restart", "jobber"]);
        }
    }
    let logs = || -> Vec<String> {
        std::fs::read_dir(&jobs)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        wait_until(T, || logs().len() <= 3 && !ancient.exists()),
        "{:?}",
        logs()
    );
    // The newest three are the ones kept.
    let mut kept = logs();
    kept.sort();
    assert!(kept.iter().all(|n| n.starts_with("jobber-")), "{kept:?}");
    root.assert_logged("logs/jobs: removed");
}
