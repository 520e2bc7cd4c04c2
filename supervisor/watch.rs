//! `watch`: the live view. Every second: each daemon's state, pid, uptime, restarts, CPU, memory
//! and health, then the latest events. `q` quits. `status` stays the one-shot form.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use ringrift::events::Event;
use ringrift::protocol::{FromSupervisor, StatusReport, ToSupervisor};

use crate::cli::{self, Client, EXIT_FAILED};

const EVENTS_SHOWN: usize = 12;

/// Puts the terminal back the way it was, however `watch` ends.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(original) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None);
        };
        let mut raw = original.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(original))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, t);
        }
    }
}

pub(crate) fn run(client: &mut Client, once: bool) -> i32 {
    let _raw = if once {
        RawMode(None)
    } else {
        RawMode::enter()
    };
    let mut last_cpu: BTreeMap<String, (f64, Instant)> = BTreeMap::new();
    let mut events: Vec<Event> = Vec::new();
    let mut since = None;
    loop {
        let report = match client.call(
            &ToSupervisor::Status { name: None },
            Duration::from_secs(10),
        ) {
            Ok(FromSupervisor::Status(r)) => r,
            Ok(other) => return cli::report(&other),
            Err(e) => {
                eprintln!("\r\nerror: {e}");
                return EXIT_FAILED;
            }
        };
        match fetch_events(client, since) {
            Ok(new) => {
                if let Some(last) = new.last() {
                    since = Some(last.seq);
                }
                events.extend(new);
                let excess = events.len().saturating_sub(EVENTS_SHOWN);
                events.drain(..excess);
            }
            Err(e) => {
                eprintln!("\r\nerror: {e}");
                return EXIT_FAILED;
            }
        }
        let frame = render(&report, &events, &mut last_cpu, !once);
        let mut out = std::io::stdout().lock();
        if out
            .write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
            || once
        {
            return 0;
        }
        drop(out);
        if quit_requested(Duration::from_secs(1)) {
            println!("\r");
            return 0;
        }
    }
}

fn fetch_events(client: &mut Client, since: Option<u64>) -> Result<Vec<Event>, String> {
    client.send(&ToSupervisor::Events {
        since,
        types: Vec::new(),
        follow: false,
        limit: Some(EVENTS_SHOWN),
    })?;
    let mut out = Vec::new();
    loop {
        match client.next_frame(Some(Duration::from_secs(10)))? {
            FromSupervisor::Event { event } => out.push(event),
            FromSupervisor::EndOfEvents { .. } => return Ok(out),
            other => return Err(format!("unexpected answer: {other:?}")),
        }
    }
}

/// Waits up to `wait` for a key; true for q, Q, Ctrl-C or the end of input.
fn quit_requested(wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let stdin = std::io::stdin();
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::from(left.as_millis().min(60_000) as u16);
        match poll(&mut fds, ms) {
            Ok(0) => return false,
            Ok(_) => {
                let mut byte = [0u8; 64];
                match nix::unistd::read(std::io::stdin().as_fd(), &mut byte) {
                    Ok(0) => return true,
                    Ok(n) => {
                        if byte[..n].iter().any(|b| matches!(b, b'q' | b'Q' | 3)) {
                            return true;
                        }
                    }
                    Err(_) => return true,
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

fn render(
    report: &StatusReport,
    events: &[Event],
    last_cpu: &mut BTreeMap<String, (f64, Instant)>,
    clear: bool,
) -> String {
    let mut s = String::new();
    if clear {
        s.push_str("\x1b[H\x1b[2J");
    }
    let sup = &report.supervisor;
    let nl = if clear { "\r\n" } else { "\n" };
    s.push_str(&format!(
        "ringrift-supervisor pid {}  up {}  {}  events {}  jobs {}   (q to quit){nl}{nl}",
        sup.pid,
        cli::human_duration(sup.uptime_secs),
        sup.root,
        report.events.last_seq,
        report.jobs.len()
    ));
    s.push_str(&format!(
        "{:<22} {:<13} {:>7} {:>8} {:>4} {:>6} {:>8}  {}{nl}",
        "NAME", "STATE", "PID", "UPTIME", "RST", "CPU%", "RSS", "HEALTH"
    ));
    let now = Instant::now();
    for d in &report.daemons {
        let cpu = match (d.cpu_secs, last_cpu.get(&d.name)) {
            (Some(c), Some((prev, at))) if c >= *prev => {
                let dt = now.duration_since(*at).as_secs_f64();
                if dt > 0.0 {
                    format!("{:.1}", (c - prev) / dt * 100.0)
                } else {
                    "-".into()
                }
            }
            _ => "-".into(),
        };
        if let Some(c) = d.cpu_secs {
            last_cpu.insert(d.name.clone(), (c, now));
        }
        let rss = d
            .rss_bytes
            .map(|b| format!("{:.1}M", b as f64 / 1_048_576.0))
            .unwrap_or_else(|| "-".into());
        let health = if d.state.is_at_rest() || d.state == ringrift::lifecycle::DaemonState::Backoff
        {
            d.reason
                .clone()
                .or_else(|| d.last_exit.clone())
                .unwrap_or_default()
        } else {
            d.health.message.clone()
        };
        let mut health: String = health.chars().take(60).collect();
        if d.event_backlog > 0 {
            health = format!("[backlog {}] {health}", d.event_backlog);
        }
        s.push_str(&format!(
            "{:<22} {:<13} {:>7} {:>8} {:>4} {:>6} {:>8}  {}{nl}",
            d.name,
            d.state.as_str(),
            d.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            d.uptime_secs
                .map(cli::human_duration)
                .unwrap_or_else(|| "-".into()),
            d.restarts,
            cpu,
            rss,
            health
        ));
    }
    for j in &report.jobs {
        s.push_str(&format!(
            "  job {} (pid {}, {:.0}s of {:.0}s): {}{nl}",
            j.id,
            j.pid,
            j.runtime_secs,
            j.max_runtime_secs,
            j.command.join(" ")
        ));
    }
    s.push_str(&format!("{nl}LATEST EVENTS{nl}"));
    if events.is_empty() {
        s.push_str(&format!("  (none yet){nl}"));
    }
    for e in events {
        let time = e.timestamp.get(11..19).unwrap_or(&e.timestamp);
        let mut payload = e.payload.to_string();
        if payload.len() > 70 {
            payload.truncate(67);
            payload.push_str("...");
        }
        s.push_str(&format!(
            "  {:>6} {time} {:<28} {:<18} {payload}{nl}",
            e.seq, e.event_type, e.source
        ));
    }
    s
}
