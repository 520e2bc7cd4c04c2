//! Processes left behind by an earlier supervisor of the same root.
//!
//! The supervisor keeps `run/processes` up to date with the process groups it owns (leader pid and
//! its start time, so a reused pid is never mistaken for ours). When a supervisor starts, it stops
//! whatever an earlier incarnation left: the recorded groups whose leader is still the same process,
//! and any process whose environment marks it as part of this root's tree under another supervisor
//! (a grandchild that moved to its own session still carries RINGRIFT_ROOT).

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringrift::procfs;
use ringrift::protocol::{ROOT_ENV, SUPERVISOR_PID_ENV};

use crate::logwriter::SupervisorLog;
use crate::paths::Paths;
use crate::unix;

const FILE: &str = "processes";

/// Rewrites run/processes: one `pgid start_time what` line per live group.
pub(crate) fn record(paths: &Paths, groups: &[(u32, u64, String)]) -> io::Result<()> {
    let mut text = String::new();
    for (pgid, start, what) in groups {
        text.push_str(&format!("{pgid} {start} {what}\n"));
    }
    let path = paths.run_dir.join(FILE);
    let tmp = paths.run_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(tmp, path)
}

/// One process found to belong to an earlier incarnation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Leftover {
    pub pid: u32,
    pub pgid: u32,
    pub why: String,
}

/// Finds what earlier supervisors of this root left running.
pub(crate) fn find(paths: &Paths) -> Vec<Leftover> {
    let me = std::process::id();
    let my_pgid = procfs::stat(me).map(|s| s.pgid).unwrap_or(0);
    let mut out = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string(paths.run_dir.join(FILE)) {
        for line in text.lines() {
            let mut it = line.splitn(3, ' ');
            let (Some(pgid), Some(start)) = (
                it.next().and_then(|p| p.parse::<u32>().ok()),
                it.next().and_then(|s| s.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let what = it.next().unwrap_or("?");
            if let Some(stat) = procfs::stat(pgid)
                && start != 0
                && stat.start_time == start
                && !stat.is_zombie()
            {
                out.insert(Leftover {
                    pid: pgid,
                    pgid,
                    why: format!("recorded as {what}"),
                });
            }
        }
    }
    let root = paths.root.display().to_string();
    for pid in procfs::pids() {
        if pid == me {
            continue;
        }
        let Some(env) = procfs::environ(pid) else {
            continue;
        };
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if var(ROOT_ENV) != Some(root.as_str()) {
            continue;
        }
        let Some(sup) = var(SUPERVISOR_PID_ENV) else {
            continue;
        };
        if sup == me.to_string() {
            continue;
        }
        let Some(stat) = procfs::stat(pid) else {
            continue;
        };
        if stat.is_zombie() {
            continue;
        }
        // Never signal our own group, whatever a process claims.
        let pgid = if stat.pgid == my_pgid { 0 } else { stat.pgid };
        out.insert(Leftover {
            pid,
            pgid,
            why: format!("spawned by supervisor pid {sup}"),
        });
    }
    out.into_iter().collect()
}

/// Kills every leftover (whole groups where possible) and waits, bounded, until they are gone.
pub(crate) fn clean(paths: &Paths, log: &SupervisorLog) {
    let found = find(paths);
    if found.is_empty() {
        return;
    }
    for l in &found {
        let cmd = procfs::cmdline(l.pid);
        log.warn(&format!(
            "stopping a process left by an earlier supervisor: pid {} (group {}), {}: {}",
            l.pid,
            l.pgid,
            l.why,
            cmd.trim()
        ));
        if l.pgid != 0 {
            unix::signal_group(l.pgid, Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(l.pid as i32), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && found
            .iter()
            .any(|l| procfs::stat(l.pid).is_some_and(|s| !s.is_zombie()))
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}
