//! `watch`: the live view. Every second: the loop per config key (generation, games, model age,
//! stage, last promotion, rating), each daemon's state, pid, uptime, restarts, CPU, memory and
//! health, then the latest events. `q` quits. `status` stays the one-shot form.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use ringrift::events::Event;
use ringrift::protocol::{EventsRequest, FromSupervisor, Request, StatusReport, StatusRequest};

use crate::cli::{self, Client, ClientError, EXIT_FAILED};

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
            &Request::Status(StatusRequest::default()),
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
        let frame = render(&report, &events, &mut last_cpu, !once, terminal_size());
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

fn fetch_events(client: &mut Client, since: Option<u64>) -> Result<Vec<Event>, ClientError> {
    client.send(&Request::Events(EventsRequest {
        since,
        types: Vec::new(),
        follow: false,
        limit: Some(EVENTS_SHOWN),
    }))?;
    let mut out = Vec::new();
    loop {
        match client.next_frame(Some(Duration::from_secs(10)))? {
            FromSupervisor::Event { event } => out.push(event),
            FromSupervisor::EndOfEvents { .. } => return Ok(out),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
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

/// The terminal's size in (columns, rows): the terminal on stdout when there is one, else
/// `COLUMNS` / `LINES`, else 80×24.
fn terminal_size() -> (usize, usize) {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own and pass by pointer; on a
    // descriptor that is not a terminal it fails and leaves it untouched.
    let got = unsafe {
        nix::libc::ioctl(
            nix::libc::STDOUT_FILENO,
            nix::libc::TIOCGWINSZ,
            &mut ws as *mut nix::libc::winsize,
        )
    } == 0;
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let cols = if got && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        env("COLUMNS").unwrap_or(80)
    };
    let rows = if got && ws.ws_row > 0 {
        usize::from(ws.ws_row)
    } else {
        env("LINES").unwrap_or(24)
    };
    (cols.max(20), rows.max(5))
}

/// `text` as one screen line of at most `width` columns: control characters (a newline or an
/// escape sequence in a payload would wreck the screen) become spaces, and a cut line ends in `…`.
/// Measures display columns (UAX #11: a CJK character or an emoji takes two), never bytes, so a
/// multi-byte character is never split and a wide one never pushes the line past the edge.
fn fit(text: &str, width: usize) -> String {
    use unicode_width::UnicodeWidthChar;
    let clean: Vec<char> = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cols = |c: &char| c.width().unwrap_or(0);
    if clean.iter().map(cols).sum::<usize>() <= width {
        return clean.into_iter().collect::<String>().trim_end().to_string();
    }
    // Cut: keep what fits in width - 1 columns, then the ellipsis (one column).
    let mut out = String::new();
    let mut used = 0;
    for c in clean {
        let w = cols(&c);
        if used + w + 1 > width {
            break;
        }
        used += w;
        out.push(c);
    }
    if width > 0 {
        out.push('…');
    }
    out
}

/// One frame for a `cols`×`rows` terminal: no line is wider than `cols` and there are at most
/// `rows` lines (the per-key view first, then daemons; jobs and events get the rows left, with a
/// count of what did not fit).
fn render(
    report: &StatusReport,
    events: &[Event],
    last_cpu: &mut BTreeMap<String, (f64, Instant)>,
    clear: bool,
    (cols, rows): (usize, usize),
) -> String {
    let sup = &report.supervisor;
    let mut top = vec![
        format!(
            "ringrift-supervisor pid {}  up {}  events {}  jobs {}  (q quits)",
            sup.pid,
            cli::human_duration(sup.uptime_secs),
            report.events.last_seq,
            report.jobs.len()
        ),
        format!("root {}", sup.root),
    ];
    if let Some(why) = &sup.http_error {
        top.push(format!("warning: HTTP monitoring is off: {why}"));
    }
    let row = |c: [&str; 8]| {
        format!(
            "{:<21} {:<13} {:>7} {:>7} {:>3} {:>5} {:>6} {}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        )
    };
    let now = Instant::now();
    let mut daemons = vec![row([
        "NAME", "STATE", "PID", "UPTIME", "RST", "CPU%", "RSS", "HEALTH",
    ])];
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
            .map(|b| format!("{:.0}M", b as f64 / 1_048_576.0))
            .unwrap_or_else(|| "-".into());
        let health = d.summary().message;
        let health = if d.event_backlog > 0 {
            format!("[backlog {}] {health}", d.event_backlog)
        } else {
            health
        };
        let pid = d.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let up = d
            .uptime_secs
            .map(cli::human_duration)
            .unwrap_or_else(|| "-".into());
        let restarts = d.restarts.to_string();
        daemons.push(row([
            &d.name,
            d.state.as_str(),
            &pid,
            &up,
            &restarts,
            &cpu,
            &rss,
            &health,
        ]));
    }
    // The loop at a glance: one line per config key, under its own header.
    let pipeline: Vec<String> = if report.pipeline.is_empty() {
        Vec::new()
    } else {
        // 80 columns for a key of up to 10 characters (`status` has the long headers).
        let prow = |c: &[String; 8]| {
            format!(
                "{:<10} {:>3} {:>7} {:>6} {:>9} {:<18} {:<16} {}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
            )
        };
        let headers = [
            "KEY",
            "GEN",
            "GAMES",
            "NEW",
            "MODEL AGE",
            "STAGE",
            "PROMOTED",
            "ELO",
        ];
        std::iter::once(prow(&headers.map(String::from)))
            .chain(cli::pipeline_rows(&report.pipeline).iter().map(prow))
            .collect()
    };
    let jobs: Vec<String> = report
        .jobs
        .iter()
        .map(|j| {
            format!(
                "  job {} pid {} {:.0}/{:.0}s: {}",
                j.id,
                j.pid,
                j.runtime_secs,
                j.max_runtime_secs,
                j.command.join(" ")
            )
        })
        .collect();
    let event_lines: Vec<String> = events
        .iter()
        .rev()
        .map(|e| {
            let time = e.timestamp.get(11..19).unwrap_or(&e.timestamp);
            format!(
                "{:>6} {time} {:<27} {:<12} {}",
                e.seq, e.event_type, e.source, e.payload
            )
        })
        .collect();

    // Rows: the top, then daemons (a "more" line when they do not all fit), jobs, and the newest
    // events under their heading, each given what is left.
    let mut lines = top;
    lines.truncate(rows);
    let take = |lines: &mut Vec<String>, items: Vec<String>, what: &str| {
        let left = rows.saturating_sub(lines.len());
        if items.len() <= left {
            lines.extend(items);
        } else if left > 0 {
            let shown = left - 1;
            let hidden = items.len() - shown;
            lines.extend(items.into_iter().take(shown));
            lines.push(format!("  … {hidden} more {what}"));
        }
    };
    take(&mut lines, pipeline, "config keys (see `status`)");
    take(&mut lines, daemons, "daemons (see `status`)");
    take(&mut lines, jobs, "jobs (see `status`)");
    if rows.saturating_sub(lines.len()) >= 2 {
        lines.push("LATEST EVENTS (newest first)".into());
        if event_lines.is_empty() {
            lines.push("  (none yet)".into());
        } else {
            take(&mut lines, event_lines, "events (see `events`)");
        }
    }
    let fitted: Vec<String> = lines.iter().map(|l| fit(l, cols)).collect();
    if clear {
        // Home and clear, and no newline after the last row: one would scroll the top away.
        format!("\x1b[H\x1b[2J{}", fitted.join("\r\n"))
    } else {
        let mut s = fitted.join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringrift::protocol::{EventsInfo, SupervisorInfo};
    use serde_json::json;

    fn report(daemons: usize) -> StatusReport {
        let daemon = |i: usize| {
            serde_json::from_value(json!({
                "name": format!("unified_idle_shutdown{i}"), "state": "SHUTTING_DOWN", "enabled": true,
                "kind": "worker", "pid": 4_194_304, "uptime_secs": 1e7, "restarts": 12345,
                "health": {"healthy": true, "status": "ok", "message": "ü".repeat(300), "details": {}},
                "heartbeat_age_secs": 1.0, "progress": {}, "depends_on": [], "last_exit": null,
                "reason": null, "cpu_secs": 1.0, "rss_bytes": 123_456_789_012u64,
                "subscriptions": [], "event_backlog": 7
            }))
            .unwrap()
        };
        StatusReport {
            supervisor: SupervisorInfo {
                pid: 1,
                root: "/a/very/long/root/".repeat(10),
                uptime_secs: 5.0,
                config_path: "x".into(),
                version: "0".into(),
                http: None,
                containment: None,
                containment_detail: None,
                http_error: Some("cannot listen on 127.0.0.1:8770: Address in use".into()),
            },
            daemons: (0..daemons).map(daemon).collect(),
            jobs: Vec::new(),
            events: serde_json::from_value::<EventsInfo>(json!({
                "last_seq": 1, "routed": 1, "retained": 1, "log_path": "x", "quarantined": []
            }))
            .unwrap(),
            pipeline: serde_json::from_value(json!({
                "hex8_2p": {"generation": 12, "games_total": 123_456_789, "games_since_export": 4321,
                            "last_export_at": 1.0, "model_sha256": "ab", "model_written_at": 1.0,
                            "model_age_secs": 99_999.0, "stage": "training",
                            "stages": ["selfplay", "training"],
                            "last_promotion": {"at": 1.0, "generation": 12}, "rating": 1523.4},
                "hex6_2p": {"generation": null, "games_total": null, "games_since_export": null,
                            "last_export_at": null, "model_sha256": null, "model_written_at": null,
                            "model_age_secs": null, "stage": "idle", "stages": [],
                            "last_promotion": null, "rating": null}
            }))
            .unwrap(),
        }
    }

    fn event(seq: u64, payload: serde_json::Value) -> Event {
        serde_json::from_value(json!({
            "seq": seq, "id": format!("id{seq}"), "type": "NEW_GAMES_AVAILABLE",
            "timestamp": "2026-11-28T08:30:00.123Z", "source": "auto_export", "payload": payload
        }))
        .unwrap()
    }

    fn display_width(s: &str) -> usize {
        unicode_width::UnicodeWidthStr::width(s)
    }

    #[test]
    fn wide_characters_are_measured_in_columns() {
        for cols in [1, 2, 3, 10, 79, 80] {
            for text in [
                "全角文字".repeat(30),
                "😀".repeat(50),
                format!("a{}", "全".repeat(50)),
            ] {
                let line = fit(&text, cols);
                assert!(display_width(&line) <= cols, "{line:?} wider than {cols}");
                assert!(line.ends_with('…'), "{line:?}");
            }
        }
        assert_eq!(fit("short", 80), "short");
    }

    #[test]
    fn multi_byte_characters_at_every_cut_never_panic() {
        // A payload whose characters straddle every possible cut-off.
        for pad in 0..8 {
            let text = format!("{}{}", "a".repeat(pad), "é€😀全角\u{1b}[2J\n".repeat(40));
            let events = vec![event(1, json!({ "config_key": text }))];
            for cols in [20, 79, 80, 81, 200] {
                let frame = render(&report(3), &events, &mut BTreeMap::new(), false, (cols, 24));
                for line in frame.lines() {
                    assert!(display_width(line) <= cols, "{line:?} wider than {cols}");
                    assert!(
                        !line.contains('\u{1b}'),
                        "escape reached the screen: {line:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_frame_fits_80_by_24() {
        let events: Vec<Event> = (1..=30).map(|i| event(i, json!({"n": i}))).collect();
        for daemons in [0, 15, 40] {
            let frame = render(
                &report(daemons),
                &events,
                &mut BTreeMap::new(),
                true,
                (80, 24),
            );
            let lines: Vec<&str> = frame.split("\r\n").collect();
            assert!(lines.len() <= 24, "{} rows", lines.len());
            assert!(!frame.ends_with('\n'), "a last newline would scroll");
            for l in &lines {
                let l = l.trim_start_matches("\x1b[H\x1b[2J");
                assert!(display_width(l) <= 80, "{l:?}");
            }
        }
        let frame = render(&report(40), &events, &mut BTreeMap::new(), false, (80, 24));
        assert!(frame.contains("more daemons"), "{frame}");
        let frame = render(&report(15), &events, &mut BTreeMap::new(), false, (80, 24));
        assert!(frame.contains("LATEST EVENTS"), "{frame}");
        // The per-key view comes before the daemons, whatever their number.
        for daemons in [0, 40] {
            let frame = render(
                &report(daemons),
                &[],
                &mut BTreeMap::new(),
                false,
                (200, 24),
            );
            let lines: Vec<&str> = frame.lines().collect();
            assert!(lines[3].starts_with("KEY "), "{frame}");
            assert!(
                lines[4].starts_with("hex6_2p") && lines[4].contains(" idle "),
                "{frame}"
            );
            assert!(lines[5].starts_with("hex8_2p"), "{frame}");
            assert!(lines[5].contains("training+selfplay"), "{frame}");
            assert!(
                lines[5].contains("gen 12, ") && lines[5].ends_with("1523"),
                "{frame}"
            );
        }
        // A key's line fits 80 columns uncut.
        let frame = render(&report(3), &[], &mut BTreeMap::new(), false, (80, 24));
        let line = frame.lines().find(|l| l.starts_with("hex6_2p")).unwrap();
        assert!(line.ends_with(" -") && !line.contains('…'), "{frame}");
        assert!(frame.contains("HTTP monitoring is off"), "{frame}");
    }
}
