//! Issue 10, points 1 and 2: nothing a daemon started escapes its stop (cgroup v2 per daemon and
//! job, or process groups plus the environment sweep where no cgroup can be had), and the
//! supervisor and its children hold no descriptor their caller left open.
//!
//! The cgroup tests run with cgroups where a cgroup v2 hierarchy is writable and say so when they
//! fall back; the fallback itself is tested with `containment: process-group`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// A daemon whose shell puts `sleep 1003` in a new session (out of the daemon's process group)
/// and writes its pid to `escaped.pid` in the root.
fn escaper_config(containment: &str) -> String {
    format!(
        "containment: {containment}\nhttp:\n  enabled: false\ndefaults:\n  grace_period: 2\ndaemons:\n  escaper:\n    command: [\"sh\", \"-c\", \"setsid sleep 1003 & echo $! > escaped.pid.tmp; mv escaped.pid.tmp escaped.pid; exec sleep 1000\"]\n    memory_max: 256M\n    cpu_max: 50%\n"
    )
}

/// An escaped `sleep <arg>` process, killed at the end of a test that failed before the
/// supervisor did.
struct Escaped {
    pid: u32,
    arg: &'static str,
}

impl Drop for Escaped {
    fn drop(&mut self) {
        let argv = procfs::argv(self.pid).unwrap_or_default();
        if alive(self.pid)
            && argv.first().is_some_and(|p| p == "sleep")
            && argv.get(1).is_some_and(|a| a == self.arg)
        {
            signal(self.pid, SIGKILL);
        }
    }
}

/// The escaped process whose pid a shell wrote to `pid_file`, once it has.
fn escaped(root: &Root, pid_file: &std::path::Path, arg: &'static str) -> Escaped {
    assert!(
        wait_until(T, || pid_file.exists()),
        "no {} was written\n{}",
        pid_file.display(),
        root.master_log()
    );
    let pid = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Escaped { pid, arg }
}

/// Starts the escaper and returns the pid of the process that left its group.
fn start_escaper(root: &Root) -> Escaped {
    let pid_file = root.path().join("escaped.pid");
    let _ = std::fs::remove_file(&pid_file);
    root.ok(&["start", "escaper"]);
    let escaped = escaped(root, &pid_file, "1003");
    assert!(alive(escaped.pid), "sleep 1003 should be running");
    let daemon = root.pid("escaper").unwrap();
    assert_ne!(
        pgid(escaped.pid),
        pgid(daemon),
        "sleep 1003 left the daemon's process group"
    );
    escaped
}

/// The containment the supervisor reports, and the subtree directory when it is "cgroup".
fn containment(root: &Root) -> (String, Option<PathBuf>) {
    let sup = root.status().supervisor;
    let kind = sup.containment.expect("containment in status");
    let detail = sup.containment_detail.unwrap_or_default();
    if kind == "cgroup" {
        (kind, Some(PathBuf::from(detail)))
    } else {
        eprintln!("NOTE: no cgroup containment here ({detail}): testing the fallback");
        (kind, None)
    }
}

fn cgroup_of(pid: u32) -> String {
    ringrift::cgroupfs::of_pid(pid).unwrap_or_default()
}

/// The whole story for one containment mode: stop, then shutdown, reach the escaped process;
/// status says which containment each daemon has and which limits could not be applied; the
/// subtree is gone after shutdown.
fn escaped_process_dies_with_its_daemon(mode: &str) {
    let root = Root::with_config(&escaper_config(mode));
    let escaped = start_escaper(&root);
    let (kind, subtree) = containment(&root);
    if mode == "process-group" {
        assert_eq!(kind, "process-group+environment");
    }
    let d = root.daemon("escaper");
    assert_eq!(d.containment.as_deref(), Some(kind.as_str()), "{d:#?}");
    let problems = d.containment_problems;
    // memory and cpu are cgroup v1-only on this kind of machine: status must say the limit is off.
    let controllers = subtree
        .as_ref()
        .and_then(|s| std::fs::read_to_string(s.join("cgroup.subtree_control")).ok())
        .unwrap_or_default();
    for (key, controller) in [("memory_max", "memory"), ("cpu_max", "cpu")] {
        if controllers.split_whitespace().any(|c| c == controller) {
            let file = if controller == "memory" {
                "memory.max"
            } else {
                "cpu.max"
            };
            let text = std::fs::read_to_string(
                subtree.as_ref().unwrap().join("daemon-escaper").join(file),
            )
            .unwrap();
            let want = if controller == "memory" {
                "268435456"
            } else {
                "50000 100000"
            };
            assert_eq!(text.trim(), want);
        } else {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{key} not applied: "))),
                "status should say {key} was not applied: {problems:?}"
            );
        }
    }
    let table = root.ok(&["status"]);
    assert!(
        table.contains("CONTAINMENT")
            && table.contains(if kind == "cgroup" {
                "cgroup"
            } else {
                "pgroup+env"
            }),
        "{table}"
    );
    if let Some(dir) = &subtree {
        assert!(
            cgroup_of(escaped.pid).ends_with(&format!(
                "{}/daemon-escaper",
                dir.file_name().unwrap().to_str().unwrap()
            )),
            "sleep 1003 is in the daemon's cgroup: {}",
            cgroup_of(escaped.pid)
        );
    }

    // stop: STOPPED means every process is gone, the escaped one included.
    let began = Instant::now();
    root.ok(&["stop", "escaper"]);
    assert_eq!(root.state("escaper"), DaemonState::Stopped);
    assert!(
        wait_until(Duration::from_secs(5), || !alive(escaped.pid)),
        "sleep 1003 survived stop ({mode})"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        began.elapsed()
    );
    if let Some(dir) = &subtree {
        assert!(
            wait_until(T, || !dir.join("daemon-escaper").exists()),
            "the daemon's cgroup is removed once empty"
        );
    }

    // shutdown: the same, and the subtree is gone when shutdown answers.
    let escaped = start_escaper(&root);
    root.ok(&["shutdown"]);
    assert_all_gone(&escaped, subtree.as_deref(), &format!("shutdown ({mode})"));
}

/// After `what`, the escaped process dies within 5 s and the supervisor's cgroup subtree (if it
/// had one) is gone.
fn assert_all_gone(escaped: &Escaped, subtree: Option<&std::path::Path>, what: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || !alive(escaped.pid)),
        "sleep {} survived {what}",
        escaped.arg
    );
    if let Some(dir) = subtree {
        assert!(!dir.exists(), "{} still exists after {what}", dir.display());
    }
}

#[test]
fn a_process_that_left_the_group_dies_with_its_daemon_cgroup() {
    escaped_process_dies_with_its_daemon("auto");
}

#[test]
fn a_process_that_left_the_group_dies_with_its_daemon_fallback() {
    escaped_process_dies_with_its_daemon("process-group");
}

/// `reap` after the supervisor was SIGKILLed: the daemon died with it (parent-death signal) but the
/// escaped process did not; reap finds it, and removes the dead supervisor's cgroup subtree.
fn reap_finds_what_a_dead_supervisor_left(mode: &str) {
    let root = Root::with_config(&escaper_config(mode));
    let escaped = start_escaper(&root);
    let (_, subtree) = containment(&root);
    let sup = root.supervisor_pid().unwrap();
    let daemon = root.pid("escaper").unwrap();
    signal(sup, SIGKILL);
    assert!(wait_until(T, || !alive(sup) && !alive(daemon)));
    assert!(
        alive(escaped.pid),
        "the escaped process outlives a SIGKILLed supervisor"
    );
    let out = root.run(&["reap"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains(&format!("pid {}", escaped.pid)),
        "reap names what it killed: {text}"
    );
    // reap kills the escaped process and removes the dead supervisor's subtree.
    assert_all_gone(
        &escaped,
        subtree.as_deref(),
        &format!("reap ({mode}): {text}"),
    );
}

#[test]
fn reap_kills_what_a_dead_supervisor_left_cgroup() {
    reap_finds_what_a_dead_supervisor_left("auto");
}

#[test]
fn reap_kills_what_a_dead_supervisor_left_fallback() {
    reap_finds_what_a_dead_supervisor_left("process-group");
}

/// `reap` while the supervisor runs: a process of the tree whose daemon is stopped is a stray and
/// is killed. Containment leaves none behind by itself, so the test makes one: it moves the escaped
/// process out of its cgroup (root can) before the stop. Needs cgroup containment.
#[test]
fn reap_kills_a_stray_of_a_stopped_daemon() {
    let root = Root::with_config(&escaper_config("auto"));
    let escaped = start_escaper(&root);
    let (_, subtree) = containment(&root);
    let Some(dir) = subtree else {
        eprintln!("NOTE: skipped: a stray can only be made by hand with cgroup containment");
        return;
    };
    std::fs::write(
        dir.parent().unwrap().join("cgroup.procs"),
        escaped.pid.to_string(),
    )
    .expect("move the escaped process out of its cgroup");
    root.ok(&["stop", "escaper"]);
    assert!(
        alive(escaped.pid),
        "out of its cgroup, the stop cannot see it"
    );
    let mut last = String::new();
    let reaped = wait_until(T, || {
        last = stdout(&root.run(&["reap"]));
        !alive(escaped.pid)
    });
    assert!(reaped, "reap left the stray alive: {last}");
    assert!(
        last.contains("stray: daemon escaper is no longer running"),
        "{last}"
    );
}

/// A job whose shell puts `sleep 1004` in a new session: when the job ends (here: over its
/// maximum runtime), the escaped process goes with it, and the job's cgroup is removed.
fn a_jobs_escaped_process_goes_with_the_job(mode: &str) {
    let root = Root::with_config(&format!(
        "containment: {mode}\nhttp:\n  enabled: false\ndaemons:\n  jobber:\n    command: [\"{WORKER}\", \"fault\", \"--job\", \"setsid sleep 1004 & echo $! > job.pid.tmp; mv job.pid.tmp job.pid; exec sleep 1000\", \"--job-max-runtime\", \"2\"]\n    protocol: true\n    grace_period: 1\n    job_memory_max: 64M\n"
    ));
    root.ok(&["start", "jobber"]);
    let (_, subtree) = containment(&root);
    // The job started and wrote its escaped process's pid.
    let escaped = escaped(&root, &root.path().join("job.pid"), "1004");
    if let Some(dir) = &subtree {
        let cg = cgroup_of(escaped.pid);
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(cg.contains(&format!("{name}/job-jobber-")), "{cg}");
    }
    assert!(
        wait_until(T, || !alive(escaped.pid)),
        "sleep 1004 outlived its job ({mode})\n{}",
        root.master_log()
    );
    assert!(
        wait_until(T, || root.master_log().contains("ended after")),
        "the job's end is logged\n{}",
        root.master_log()
    );
    if let Some(dir) = &subtree {
        assert!(
            wait_until(T, || std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("job-"))),
            "the job's cgroup is removed"
        );
    }
}

#[test]
fn a_jobs_escaped_process_goes_with_the_job_cgroup() {
    a_jobs_escaped_process_goes_with_the_job("auto");
}

#[test]
fn a_jobs_escaped_process_goes_with_the_job_fallback() {
    a_jobs_escaped_process_goes_with_the_job("process-group");
}

/// Fds of a process: number → link target.
fn fds(pid: u32) -> Vec<(i32, String)> {
    procfs::fds(pid)
        .expect("/proc/<pid>/fd")
        .into_iter()
        .map(|(n, target)| (n, target.display().to_string()))
        .collect()
}

/// `sh -c 'ringrift-supervisor start quiet 7>&1 | cat'` returns: neither the background supervisor
/// nor the daemons keep the caller's pipe open.
#[test]
fn start_returns_when_the_callers_pipe_is_held_on_fd_7() {
    let root = Root::with_config(&format!(
        "http:\n  enabled: false\ndaemons:\n  quiet:\n    command: [\"sleep\", \"1000\"]\n  talker:\n    command: [\"{WORKER}\", \"fault\"]\n    protocol: true\n"
    ));
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg("\"$SUP\" start quiet talker 7>&1 | cat")
        .env("SUP", SUPERVISOR)
        .env("RINGRIFT_ROOT", root.path())
        .current_dir(root.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut sh, 0);
    let mut child = sh.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    // Read to EOF on a thread: EOF comes only when nobody holds the pipe's write end any more.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { out }, &mut text);
        text
    });
    let returned = wait_until(Duration::from_secs(15), || {
        child.try_wait().unwrap().is_some() && reader.is_finished()
    });
    if !returned {
        signal(child.id(), SIGKILL);
    }
    assert!(
        returned,
        "`start ... 7>&1 | cat` did not return within 15 s\n{}",
        root.master_log()
    );
    let text = reader.join().unwrap();
    assert!(text.contains("quiet") && text.contains("RUNNING"), "{text}");

    // The plain daemon holds exactly 0, 1, 2.
    let quiet = root.pid("quiet").unwrap();
    let numbers: Vec<i32> = fds(quiet).iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, vec![0, 1, 2], "{:?}", fds(quiet));
    // The protocol worker holds 0, 1, 2, its socket to the supervisor, and what it opened itself:
    // no pipe but its own stdout/stderr.
    let talker = root.pid("talker").unwrap();
    let talker_fds = fds(talker);
    let own: BTreeSet<String> = talker_fds
        .iter()
        .filter(|(n, _)| *n == 1 || *n == 2)
        .map(|(_, t)| t.clone())
        .collect();
    for (n, t) in &talker_fds {
        assert!(
            !t.starts_with("pipe:") || own.contains(t),
            "worker fd {n} is a pipe it did not get as stdout/stderr: {talker_fds:?}"
        );
    }
    // The supervisor: 0 is /dev/null, and its only pipes are the read ends of its daemons'
    // stdout/stderr.
    let sup = root.supervisor_pid().unwrap();
    let sup_fds = fds(sup);
    assert_eq!(sup_fds[0], (0, "/dev/null".to_string()), "{sup_fds:?}");
    let daemon_pipes: BTreeSet<String> = [quiet, talker]
        .iter()
        .flat_map(|p| fds(*p))
        .filter(|(n, _)| *n == 1 || *n == 2)
        .map(|(_, t)| t)
        .collect();
    for (n, t) in &sup_fds {
        assert!(
            !t.starts_with("pipe:") || daemon_pipes.contains(t),
            "supervisor fd {n} is a pipe that is not a daemon's output: {sup_fds:?}"
        );
    }
}
