//! Shared helpers for the integration tests: a temporary root with its own supervisor, CLI calls,
//! status and event queries, and waiting for conditions with deadlines. Every process a test starts
//! is stopped when its `Root` is dropped.
//!
//! `status --json` and `events --json` are read into the library's own types
//! ([`StatusReport`], [`Event`]) and checked to carry exactly their fields, so every test that
//! looks at them is also a contract test of the JSON. Processes are read with `ringrift::procfs`
//! and signalled with nix.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal::{self, SIGCONT, SIGHUP, SIGINT, SIGKILL, SIGSTOP};
pub use ringrift::events::Event;
pub use ringrift::lifecycle::DaemonState;
pub use ringrift::procfs;
pub use ringrift::protocol::{DaemonStatus, Health, StatusReport};
pub use serde_json::Value;

pub const SUPERVISOR: &str = env!("CARGO_BIN_EXE_ringrift-supervisor");
pub const WORKER: &str = env!("CARGO_BIN_EXE_ringrift-worker");

pub struct Root {
    pub dir: tempfile::TempDir,
}

impl Root {
    pub fn new() -> Root {
        Root {
            dir: tempfile::Builder::new()
                .prefix("rr-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    /// A root with this configuration in config/unified_loop.yaml.
    pub fn with_config(yaml: &str) -> Root {
        let root = Root::new();
        root.write_config(yaml);
        root
    }

    pub fn write_config(&self, yaml: &str) {
        let dir = self.path().join("config");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("unified_loop.yaml"), yaml).unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SUPERVISOR);
        c.args(args)
            .current_dir(self.path())
            .env("RINGRIFT_ROOT", self.path())
            .env_remove("RINGRIFT_CONFIG");
        c
    }

    /// The CLI run through `wrapper` (a program and its arguments, e.g. `prlimit --nofile=1024`
    /// or `nsenter --net=...`), with the same environment as [`Root::cmd`].
    pub fn cmd_via(&self, wrapper: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..])
            .arg(SUPERVISOR)
            .args(args)
            .current_dir(self.path())
            .env("RINGRIFT_ROOT", self.path())
            .env_remove("RINGRIFT_CONFIG");
        c
    }

    /// Runs the CLI and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run ringrift-supervisor")
    }

    /// Runs the CLI and insists on exit code 0.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with_env(args, &[])
    }

    /// Runs the CLI with these extra environment variables and insists on exit code 0.
    pub fn ok_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self
            .cmd(args)
            .envs(env.iter().copied())
            .output()
            .expect("run ringrift-supervisor");
        assert!(
            out.status.success(),
            "`ringrift-supervisor {}` failed with {:?}\nstdout:\n{}\nstderr:\n{}\nmaster log:\n{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.master_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `status --json`, read into the library's own types (see [`parse_status`]).
    pub fn status(&self) -> StatusReport {
        parse_status(&self.ok(&["status", "--json"]))
    }

    /// One daemon's entry in `status --json`.
    pub fn daemon(&self, name: &str) -> DaemonStatus {
        daemon(&self.status(), name).clone()
    }

    pub fn state(&self, name: &str) -> DaemonState {
        self.daemon(name).state
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.daemon(name).pid
    }

    /// Waits until `name`'s status entry satisfies `good`, returning it.
    pub fn wait_daemon(
        &self,
        name: &str,
        within: Duration,
        good: impl Fn(&DaemonStatus) -> bool,
    ) -> DaemonStatus {
        let mut last = None;
        let found = wait_until(within, || {
            let d = self.daemon(name);
            let done = good(&d);
            last = Some(d);
            done
        });
        assert!(
            found,
            "{name} not as expected within {within:?}; last status: {last:#?}\nmaster log:\n{}",
            self.master_log()
        );
        last.unwrap()
    }

    /// Waits until `name` is in `state`, returning its status entry.
    pub fn wait_state(&self, name: &str, state: DaemonState, within: Duration) -> DaemonStatus {
        self.wait_daemon(name, within, |d| d.state == state)
    }

    /// Waits until `name`'s health satisfies `good`, returning it (health is reported when a
    /// cycle or an event has been handled, which can be a while after what the test did).
    pub fn wait_health(
        &self,
        name: &str,
        within: Duration,
        good: impl Fn(&Health) -> bool,
    ) -> Health {
        self.wait_daemon(name, within, |d| good(&d.health)).health
    }

    /// `events --json` with these extra arguments, each line read into the library's [`Event`].
    pub fn events(&self, extra: &[&str]) -> Vec<Event> {
        let mut args = vec!["events", "--json"];
        args.extend_from_slice(extra);
        self.ok(&args).lines().map(parse_event).collect()
    }

    /// The events of one type (`events --json --type KIND`).
    pub fn events_of(&self, kind: &str) -> Vec<Event> {
        self.events(&["--type", kind])
    }

    /// Waits until a daemon's log (logs/<name>.log) contains `needle`, returning its text.
    pub fn wait_log(&self, name: &str, needle: &str, within: Duration) -> String {
        wait_file_contains(&self.log_path(name), needle, within)
    }

    pub fn master_log(&self) -> String {
        std::fs::read_to_string(self.path().join("logs/master_loop.log")).unwrap_or_default()
    }

    /// Insists that the supervisor's log (logs/master_loop.log) contains `needle`.
    pub fn assert_logged(&self, needle: &str) {
        let log = self.master_log();
        assert!(
            log.contains(needle),
            "`{needle}` not in the master log:\n{log}"
        );
    }

    /// Starts a CLI command that keeps printing (`logs -f`, `events -f`).
    pub fn follow(&self, args: &[&str]) -> Follower {
        let mut child = self
            .cmd(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the CLI");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.path().join(format!("logs/{name}.log"))
    }

    pub fn supervisor_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.path().join("run/supervisor.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let pid = self.supervisor_pid();
        let _ = self.cmd(&["shutdown", "--timeout", "20"]).output();
        // If the orderly shutdown did not finish, kill the supervisor: its children die with it
        // (parent-death signal).
        if let Some(pid) = pid
            && !wait_until(Duration::from_secs(20), || !alive(pid))
        {
            signal(pid, SIGKILL);
        }
        // A supervisor a test SIGKILLed leaves its cgroup subtree (its next start would remove
        // it): remove this root's, and only this root's.
        if let Ok(own) = ringrift::cgroupfs::own_dir() {
            let dir = own.join(ringrift::cgroupfs::subtree_name(self.path()));
            if dir.exists() {
                ringrift::cgroupfs::kill_tree(&dir);
                let _ = ringrift::cgroupfs::remove_tree(&dir, Duration::from_secs(5));
            }
        }
    }
}

/// A CLI command that keeps printing: its stdout lines arrive on `lines`. Killed when dropped.
pub struct Follower {
    child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `within` for a child process to exit, returning how it ended.
pub fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_until(within, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status
}

/// Sends a signal to a process this test started (a process already gone is not an error).
pub fn signal(pid: u32, sig: Signal) {
    let pid = i32::try_from(pid).expect("a pid fits in i32");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    procfs::stat(pid).is_some_and(|s| !s.is_zombie())
}

/// Parent pid of a process.
pub fn ppid(pid: u32) -> Option<u32> {
    procfs::stat(pid).map(|s| s.ppid)
}

/// Process group of a process.
pub fn pgid(pid: u32) -> Option<u32> {
    procfs::stat(pid).map(|s| s.pgid)
}

/// Process state letter (R, S, T, Z, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    procfs::stat(pid).map(|s| s.state)
}

/// The number of the first line of `log` (the master log) that contains `needle`.
pub fn line_of(log: &str, needle: &str) -> usize {
    log.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in master log:\n{log}"))
}

/// The number of the last line of `log` (the master log) that contains `needle`.
pub fn last_line_of(log: &str, needle: &str) -> usize {
    log.lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in master log:\n{log}"))
}

/// A loopback TCP port that was free a moment ago (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it holds or `within` passes. Returns whether it held.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20)); // poll interval
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Reads `status --json` output (or the body of `GET /daemon/status`, the same report) into the
/// library's [`StatusReport`], and insists that the types carry every field of the JSON: written
/// back, the report is the same JSON. So every test that reads status is a contract test of it.
pub fn parse_status(text: &str) -> StatusReport {
    parse_typed(text, "status report")
}

/// Reads one line of `events --json` into the library's [`Event`], checked like [`parse_status`].
pub fn parse_event(line: &str) -> Event {
    parse_typed(line, "event")
}

fn parse_typed<T: serde::de::DeserializeOwned + serde::Serialize>(text: &str, what: &str) -> T {
    let raw: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"));
    let typed: T = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{what} does not match the library's types ({e}): {text}"));
    let again = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        again, raw,
        "{what}: the JSON has fields the library's types do not (or differ): {text}"
    );
    typed
}

/// One daemon's entry in a status report.
pub fn daemon<'a>(status: &'a StatusReport, name: &str) -> &'a DaemonStatus {
    status
        .daemons
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no daemon {name} in status: {status:#?}"))
}

/// Names of daemons in a status report that are in `state`.
pub fn in_state(status: &StatusReport, state: DaemonState) -> Vec<String> {
    status
        .daemons
        .iter()
        .filter(|d| d.state == state)
        .map(|d| d.name.clone())
        .collect()
}

/// Pids of every daemon that has one.
pub fn pids(status: &StatusReport) -> std::collections::BTreeMap<String, u32> {
    status
        .daemons
        .iter()
        .filter_map(|d| Some((d.name.clone(), d.pid?)))
        .collect()
}

/// Reading a health report's details like JSON: a missing key is null, not a panic.
pub trait Details {
    fn detail(&self, key: &str) -> &Value;
}

impl Details for Health {
    fn detail(&self, key: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.details.get(key).unwrap_or(&NULL)
    }
}

/// Waits until the file at `path` contains `needle`, returning its text.
pub fn wait_file_contains(path: &Path, needle: &str, within: Duration) -> String {
    let mut text = String::new();
    let found = wait_until(within, || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains(needle)
    });
    assert!(
        found,
        "`{needle}` not in {} within {within:?}:\n{text}",
        path.display()
    );
    text
}

/// Ids of the NEW_GAMES_AVAILABLE events a fault worker (`ringrift-worker fault --subscribe ...`)
/// printed in its log, all its incarnations, in order.
pub fn received_ids(root: &Root, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root.log_path(name)).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("type=NEW_GAMES_AVAILABLE"))
        .filter_map(|l| {
            l.split(" id=")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_string)
        })
        .collect()
}

/// Resident memory of a process, in KiB (the rss field of /proc/<pid>/stat).
pub fn rss_kib(pid: u32) -> u64 {
    let stat = procfs::stat(pid).expect("/proc/<pid>/stat of a live process");
    stat.rss_pages * procfs::page_size() / 1024
}

/// True when the tests run as root (then hostile inputs are tried as user nobody).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `program args` as user nobody (uid and gid 65534), from `/`, returning its output. Only
/// possible as root.
pub fn as_nobody(program: &str, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(program)
        .args(args)
        .uid(65534)
        .gid(65534)
        .env_remove("RINGRIFT_ROOT")
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("run {program} as nobody: {e}"))
}

/// Plays `games` games of `key` into the games DB `db`: a selfplay job run directly, from the
/// root, as selfplay_scheduler would run it.
pub fn play_games(root: &Root, db: &Path, key: &str, games: u32, seed: u32) {
    let (games, seed, db) = (
        games.to_string(),
        seed.to_string(),
        db.display().to_string(),
    );
    worker_job(
        root,
        &[
            "selfplay",
            "--config-key",
            key,
            "--games",
            &games,
            "--seed",
            &seed,
            "--db",
            &db,
        ],
    );
}

/// Runs a reference job of the worker (`ringrift-worker job <args>`) from `root`, outside any
/// supervisor, insisting on success.
pub fn worker_job(root: &Root, args: &[&str]) {
    let out = Command::new(WORKER)
        .arg("job")
        .args(args)
        .current_dir(root.path())
        .env_remove("RINGRIFT_SUPERVISOR_SOCKET")
        .output()
        .expect("run ringrift-worker job");
    assert!(
        out.status.success(),
        "job {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
