//! Shared helpers for the integration tests: a temporary root with its own supervisor, CLI calls,
//! status queries, and waiting for conditions with deadlines. Every process a test starts is
//! stopped when its `Root` is dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

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

    /// Runs the CLI and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run ringrift-supervisor")
    }

    /// Runs the CLI and insists on exit code 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
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

    pub fn status(&self) -> Value {
        let text = self.ok(&["status", "--json"]);
        serde_json::from_str(&text).expect("status --json is JSON")
    }

    pub fn daemon(&self, name: &str) -> Value {
        let s = self.status();
        s["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no daemon {name} in status"))
    }

    pub fn state(&self, name: &str) -> String {
        self.daemon(name)["state"].as_str().unwrap().to_string()
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.daemon(name)["pid"].as_u64().map(|p| p as u32)
    }

    /// Waits until `name` is in `state`, returning its status entry.
    pub fn wait_state(&self, name: &str, state: &str, within: Duration) -> Value {
        let mut last = Value::Null;
        let found = wait_until(within, || {
            last = self.daemon(name);
            last["state"] == state
        });
        assert!(
            found,
            "{name} did not reach {state} within {within:?}; last status: {last:#}\nmaster log:\n{}",
            self.master_log()
        );
        last
    }

    pub fn master_log(&self) -> String {
        std::fs::read_to_string(self.path().join("logs/master_loop.log")).unwrap_or_default()
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
            unsafe { libc_kill(pid as i32, 9) };
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Sends a signal to a process this test started.
pub fn signal(pid: u32, sig: i32) {
    unsafe {
        libc_kill(pid as i32, sig);
    }
}

pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGINT: i32 = 2;
pub const SIGHUP: i32 = 1;

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => {
            let state = text.rfind(')').and_then(|i| text[i + 2..].chars().next());
            state != Some('Z') && state != Some('X')
        }
        Err(_) => false,
    }
}

/// Parent pid of a process.
pub fn ppid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Process state letter (R, S, T, Z, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 2..].chars().next()
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

/// Names of daemons in a status report that are in `state`.
pub fn in_state(status: &Value, state: &str) -> Vec<String> {
    status["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == state)
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

/// Pids of every daemon that has one.
pub fn pids(status: &Value) -> std::collections::BTreeMap<String, u32> {
    status["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| {
            d["pid"]
                .as_u64()
                .map(|p| (d["name"].as_str().unwrap().to_string(), p as u32))
        })
        .collect()
}

/// Resident memory of a process, in KiB (VmRSS in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
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
