//! Issue 4: the monitoring HTTP server. Issue 9: nobody outside the tree steers the pipeline
//! (writes need the bearer token in run/http.token), and no input exhausts the supervisor (heads,
//! bodies and connections are bounded).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
/// How fast `status` must answer while the HTTP side is under attack: generous, only to tell
/// "answers" from "hangs".
const STATUS_WITHIN: Duration = Duration::from_secs(5);
/// RSS growth allowed after an attack, against a baseline taken after a warm-up.
const RSS_SLACK_KIB: u64 = 8 * 1024;
/// A plain process to supervise: liveness is its pid.
const IDLE_DAEMON: &str =
    "  idle:\n    command: [\"sleep\", \"1000\"]\n    backoff_initial: 10ms\n";

/// A root whose supervisor listens on an ephemeral loopback port.
fn root_with(daemons: &str) -> Root {
    Root::with_config(&format!("http:\n  addr: 127.0.0.1:0\ndaemons:\n{daemons}"))
}

/// A root whose supervisor runs [`IDLE_DAEMON`], and the address its HTTP server listens on.
fn idle_root() -> (Root, String) {
    let root = root_with(IDLE_DAEMON);
    root.ok(&["start", "idle"]);
    let a = addr(&root);
    (root, a)
}

fn addr(root: &Root) -> String {
    root.status()
        .supervisor
        .http
        .expect("http address in status")
}

/// One request on a fresh connection: (status code, content type, body).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    request_with(addr, method, path, "", body)
}

/// Like [`request`], with extra header lines (each ending in \r\n).
fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (code, head, body) = exchange(addr, raw.as_bytes()).unwrap();
    (
        code,
        header(&head, "content-type").unwrap_or_default(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Sends `raw` on a fresh connection and reads the answer until the server closes it:
/// (status code, head, body).
fn exchange(addr: &str, raw: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(T))?;
    s.set_write_timeout(Some(T))?;
    s.write_all(raw)?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    parse_response(&all)
}

fn parse_response(all: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    let bad = || std::io::Error::new(ErrorKind::InvalidData, "not an HTTP response");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, head, all[split + 4..].to_vec()))
}

/// A header's value (names compared case-insensitively).
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Insists that `body` is a JSON error (`{"error": ...}`) whose message contains `needle`.
fn assert_error(body: &str, needle: &str) {
    let message = json(body)["error"].as_str().map(str::to_string);
    assert!(
        message.as_deref().is_some_and(|m| m.contains(needle)),
        "no error containing {needle:?} in {body}"
    );
}

fn token(root: &Root) -> String {
    std::fs::read_to_string(root.path().join("run/http.token"))
        .expect("run/http.token")
        .trim()
        .to_string()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// `status` answers, and fast enough to tell it is not stuck behind the HTTP side.
fn assert_status_is_fast(root: &Root) -> StatusReport {
    let t0 = Instant::now();
    let s = root.status();
    assert!(
        t0.elapsed() < STATUS_WITHIN,
        "status took {:?}",
        t0.elapsed()
    );
    s
}

/// RSS has come back within the slack of `baseline` (allocators return memory lazily, so wait
/// for it, bounded).
fn assert_rss_near(pid: u32, baseline: u64, what: &str) {
    let mut last = 0;
    let settled = wait_until(Duration::from_secs(5), || {
        last = rss_kib(pid);
        last <= baseline + RSS_SLACK_KIB
    });
    eprintln!("{what}: supervisor RSS {last} KiB, baseline {baseline} KiB");
    assert!(
        settled,
        "{what}: supervisor RSS {last} KiB, baseline {baseline} KiB (slack {RSS_SLACK_KIB} KiB)"
    );
}

#[test]
fn routes_return_the_documented_shapes() {
    let root = root_with(&format!(
        "  broken:\n    command: [\"{WORKER}\", \"fault\", \"--exit-immediately\"]\n    protocol: true\n    max_restarts: 1\n    backoff_initial: 10ms\n"
    ));
    root.ok(&["start", "auto_sync"]);
    let _ = root.run(&["start", "broken"]);
    let a = addr(&root);

    let (code, ctype, body) = request(&a, "GET", "/daemon/status", "");
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
    let status = parse_status(&body);
    let cli = root.status();
    assert_eq!(
        status.daemons.len(),
        cli.daemons.len(),
        "same report as status --json"
    );
    assert_eq!(status.supervisor.pid, cli.supervisor.pid);

    let (code, _, body) = request(&a, "GET", "/daemon/auto_sync/health", "");
    assert_eq!(code, 200, "{body}");
    let h = json(&body);
    for key in ["healthy", "status", "message", "details", "timestamp"] {
        assert!(h.get(key).is_some(), "{key} in {h:#}");
    }
    assert_eq!(h["healthy"], true);
    let (code, _, body) = request(&a, "GET", "/daemon/AUTO_SYNC/health", "");
    assert_eq!(code, 200, "names in either case: {body}");

    let (code, _, body) = request(&a, "GET", "/daemon/broken/health", "");
    assert_eq!(code, 503, "{body}");
    assert_eq!(json(&body)["healthy"], false);

    let (code, ctype, body) = request(&a, "GET", "/daemon/auto_synk/health", "");
    assert_eq!((code, ctype.as_str()), (404, "application/json"));
    assert_error(&body, "did you mean auto_sync");

    let (code, ctype, body) = request(&a, "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    for needle in [
        "# TYPE ringrift_daemon_state gauge",
        "ringrift_daemon_state{daemon=\"auto_sync\",state=\"RUNNING\"} 1",
        "ringrift_daemon_restarts_total{daemon=\"broken\"}",
        "ringrift_daemon_uptime_seconds{daemon=\"auto_sync\"}",
        "ringrift_daemon_heartbeat_age_seconds{daemon=\"auto_sync\"}",
        "ringrift_daemon_rss_bytes{daemon=\"auto_sync\"}",
        "ringrift_daemon_cpu_seconds_total{daemon=\"auto_sync\"}",
        "ringrift_events_routed_total",
        "ringrift_supervisor_uptime_seconds",
    ] {
        assert!(
            body.contains(needle),
            "{needle} missing from /metrics:\n{body}"
        );
    }

    assert_eq!(request(&a, "GET", "/health", "").0, 200);
    let (code, _, body) = request(&a, "GET", "/ready", "");
    assert_eq!(code, 503, "a FAILED daemon means not ready: {body}");
    assert_eq!(json(&body)["not_ready"][0]["name"], "broken");

    let (code, _, body) = request(&a, "GET", "/nowhere", "");
    assert_eq!(code, 404);
    assert_error(&body, "routes:");
    assert_eq!(request(&a, "DELETE", "/metrics", "").0, 405);
}

#[test]
fn post_event_is_validated_like_emit() {
    let root = root_with("");
    root.ok(&["start", "auto_sync"]);
    let a = addr(&root);
    let auth = bearer(&token(&root));
    let post = |body: &str| request_with(&a, "POST", "/event", &auth, body);
    let (code, _, body) = post(
        r#"{"type": "NEW_GAMES_AVAILABLE", "payload": {"config": "hex8_2p", "new_games": 1}}"#,
    );
    assert_eq!(code, 400);
    assert_error(&body, "unknown field 'config' (did you mean 'config_key'?)");
    let (code, _, body) = post("not json");
    assert_eq!(code, 400, "{body}");
    let (code, _, body) = post(
        r#"{"type": "NEW_GAMES_AVAILABLE", "payload": {"config_key": "hex8_2p", "new_games": 1}}"#,
    );
    assert_eq!(code, 200, "{body}");
    let seq = json(&body)["seq"].as_u64().unwrap();
    let ev = &root.events_of("NEW_GAMES_AVAILABLE")[0];
    assert_eq!(ev.seq, seq);
    assert_eq!(ev.source, "http");
    let (code, _, body) = request(&a, "GET", &format!("/events?since={}", seq - 1), "");
    assert_eq!(code, 200);
    assert_eq!(json(&body)["events"][0]["seq"].as_u64(), Some(seq));
}

#[test]
fn ten_thousand_requests_do_not_delay_restarts_or_heartbeats() {
    let root = root_with(&format!(
        "  steady:\n    command: [\"{WORKER}\", \"fault\"]\n    protocol: true\n    heartbeat_interval: 0.1\n    heartbeat_timeout: 1\n  victim:\n    command: [\"{WORKER}\", \"fault\"]\n    protocol: true\n"
    ));
    root.ok(&["start", "steady", "victim"]);
    let a = addr(&root);
    let victim = root.pid("victim").unwrap();
    let steady = root.pid("steady").unwrap();

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let load = {
        let a = a.clone();
        std::thread::spawn(move || {
            // One keep-alive connection, 10,000 requests, then stop.
            let s = TcpStream::connect(&a).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            for _ in 0..10_000 {
                w.write_all(b"GET /daemon/status HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
            }
            let _ = done_tx.send(());
        })
    };
    // Kill the victim while the load runs; it must come back, and steady must keep heartbeating.
    signal(victim, SIGKILL);
    let mut worst = 0.0f64;
    let mut back_during_load = false;
    // Watch both daemons until the load is done (10,000 requests finish well within 10 minutes).
    let finished = wait_until(Duration::from_secs(600), || {
        let status = root.status();
        let s = daemon(&status, "steady");
        worst = worst.max(s.heartbeat_age_secs.unwrap_or(0.0));
        let v = daemon(&status, "victim");
        if v.state == DaemonState::Running
            && v.pid.is_some_and(|p| p != victim)
            && done_rx.try_recv().is_err()
        {
            back_during_load = true;
        }
        load.is_finished()
    });
    assert!(finished, "the load did not finish");
    load.join().unwrap();
    assert!(
        root.wait_state("victim", DaemonState::Running, T)
            .pid
            .unwrap()
            != victim
    );
    let s = root.daemon("steady");
    assert_eq!(s.restarts, 0, "steady's 1 s watchdog never fired");
    assert_eq!(s.pid, Some(steady));
    assert!(worst < 1.0, "heartbeat age reached {worst}s under load");
    assert!(
        back_during_load,
        "the victim was back RUNNING while the requests were still going"
    );
}

const EVENT: &str =
    r#"{"type": "NEW_GAMES_AVAILABLE", "payload": {"config_key": "hex8_2p", "new_games": 1}}"#;

#[test]
fn writes_need_the_bearer_token_from_run() {
    let (root, a) = idle_root();
    let file = root.path().join("run/http.token");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600, "run/http.token is the user's alone");
    assert_eq!(mode(&root.path().join("run")), 0o700);
    let first = token(&root);
    assert_eq!(first.len(), 64, "32 random bytes in hex: {first}");

    // No token: 401 with a challenge and a JSON error, a log line naming the peer, no event.
    let raw = format!(
        "POST /event HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{EVENT}",
        EVENT.len()
    );
    let (code, head, body) = exchange(&a, raw.as_bytes()).unwrap();
    assert_eq!(code, 401, "{head}");
    assert!(
        header(&head, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
        "{head}"
    );
    assert_error(&String::from_utf8_lossy(&body), "run/http.token");
    assert!(
        wait_until(T, || root
            .master_log()
            .contains("http: refused POST /event from 127.0.0.1:")),
        "a warn line naming the peer:\n{}",
        root.master_log()
    );
    // The body of an unauthenticated request is never read: announcing 1 MiB and sending none
    // still gets its answer at once.
    let (code, _, _) = exchange(
        &a,
        b"POST /event HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n",
    )
    .unwrap();
    assert_eq!(code, 401);

    // A wrong token, or another scheme: 401.
    let (code, _, _) = request_with(&a, "POST", "/event", &bearer(&"0".repeat(64)), EVENT);
    assert_eq!(code, 401);
    let basic = format!("Authorization: Basic {first}\r\n");
    assert_eq!(request_with(&a, "POST", "/event", &basic, EVENT).0, 401);
    let listed = root.events_of("NEW_GAMES_AVAILABLE");
    assert!(listed.is_empty(), "no forged event got in: {listed:?}");

    // The token from run/: accepted, and the event is there.
    let (code, _, body) = request_with(&a, "POST", "/event", &bearer(&first), EVENT);
    assert_eq!(code, 200, "{body}");
    let seq = json(&body)["seq"].as_u64().unwrap();
    // Even with the token, a step's result or a lifecycle fact is not the operator's to state.
    for forged in [
        r#"{"type":"EVALUATION_COMPLETED","payload":{"config_key":"hex8_2p","model_path":"/tmp/x/hex8_2p/evil.bin","win_rate_vs_random":1,"win_rate_vs_baseline":1,"games":1000}}"#,
        r#"{"type":"LOW_QUALITY_DATA_WARNING","payload":{"config_key":"hex8_2p","score":0.1,"threshold":0.5}}"#,
        r#"{"type":"DAEMON_FAILED","payload":{"daemon":"idle","reason":"forged"}}"#,
    ] {
        let (code, _, body) = request_with(&a, "POST", "/event", &bearer(&first), forged);
        assert_eq!(code, 403, "{forged}: {body}");
        assert!(body.contains("http may not emit"), "{body}");
    }
    let ev = &root.events_of("NEW_GAMES_AVAILABLE")[0];
    assert_eq!((ev.seq, ev.source.as_str()), (seq, "http"));

    // Rotation is deleting the file: the next write request finds it gone, writes a new token and
    // is refused (it carries the old one); from then on only the new token works.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        request_with(&a, "POST", "/event", &bearer(&first), EVENT).0,
        401
    );
    let second = token(&root);
    assert_ne!(second, first);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(
        request_with(&a, "POST", "/event", &bearer(&second), EVENT).0,
        200
    );
    assert_eq!(
        request_with(&a, "POST", "/event", &bearer(&first), EVENT).0,
        401
    );

    // A user other than the supervisor's can reach the port but cannot read the token.
    if is_root() {
        let cat = as_nobody("cat", &[file.to_str().unwrap()]);
        assert!(
            !cat.status.success(),
            "nobody read the token: {}",
            stdout(&cat)
        );
        assert!(stdout(&cat).is_empty());
        // curl as nobody, printing the status code only.
        let curl = |args: &[&str]| {
            let mut all = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}"];
            all.extend_from_slice(args);
            as_nobody("curl", &all)
        };
        let url = format!("http://{a}/event");
        let json = "Content-Type: application/json";
        let out = curl(&["-X", "POST", "-H", json, "--data", EVENT, &url]);
        assert_eq!(stdout(&out), "401", "{}", stderr(&out));
        let out = curl(&[&format!("http://{a}/health")]);
        assert_eq!(stdout(&out), "200", "reading stays open: {}", stderr(&out));
    } else {
        eprintln!("not root: the run-as-nobody part is skipped");
    }
}

#[test]
fn head_everywhere_get_is_absolute_form_and_half_close() {
    let (_root, a) = idle_root();
    for path in [
        "/health",
        "/ready",
        "/daemon/status",
        "/daemon/idle/health",
        "/metrics",
        "/events",
        "/events?limit=5000",
    ] {
        let get = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (gcode, ghead, gbody) = exchange(&a, get.as_bytes()).unwrap();
        let head = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (hcode, hhead, hbody) = exchange(&a, head.as_bytes()).unwrap();
        assert_eq!(hcode, gcode, "HEAD {path}: {hhead}");
        assert!(hbody.is_empty(), "HEAD {path} sent a body");
        assert_eq!(
            header(&hhead, "content-type"),
            header(&ghead, "content-type"),
            "{path}"
        );
        // The status report's uptime may change its length between the two; the rest must not.
        if path != "/daemon/status"
            && path != "/health"
            && path != "/metrics"
            && path != "/daemon/idle/health"
        {
            assert_eq!(
                header(&hhead, "content-length"),
                Some(gbody.len().to_string()),
                "HEAD {path}: {hhead}"
            );
        } else {
            assert!(
                header(&hhead, "content-length").is_some(),
                "HEAD {path}: {hhead}"
            );
        }
    }
    assert_eq!(request(&a, "HEAD", "/event", "").0, 405);
    let (code, _, _) = request(&a, "PUT", "/health", "");
    assert_eq!(code, 405);

    // RFC 9112 §3.2.2: a server must accept the absolute form.
    let raw = format!("GET http://{a}/health HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
    let (code, _, body) = exchange(&a, raw.as_bytes()).unwrap();
    assert_eq!(code, 200);
    assert_eq!(json(&String::from_utf8_lossy(&body))["status"], "ok");
    let raw = format!(
        "GET http://{a}/daemon/idle/health?x=1 HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(exchange(&a, raw.as_bytes()).unwrap().0, 200);

    // A client that shuts down its sending side after the request still gets the answer.
    let mut s = TcpStream::connect(&a).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(parse_response(&all).unwrap().0, 200);
}

/// Warms the HTTP side up (first requests allocate buffers that stay), then takes the baseline.
fn rss_baseline(root: &Root, a: &str, pid: u32) -> u64 {
    for _ in 0..20 {
        request(a, "GET", "/daemon/status", "");
        request(a, "GET", "/metrics", "");
    }
    root.status();
    rss_kib(pid)
}

#[test]
fn a_request_line_without_newline_is_cut_off() {
    let (root, a) = idle_root();
    let pid = root.supervisor_pid().unwrap();
    let idle = root.pid("idle").unwrap();
    let baseline = rss_baseline(&root, &a, pid);

    // Four at once, each `GET /` and then up to 64 MiB without a newline.
    let chunk = vec![b'a'; 1 << 20];
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let a = a.clone();
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&a).unwrap();
                s.set_write_timeout(Some(T)).unwrap();
                s.set_read_timeout(Some(T)).unwrap();
                let mut sent = 0usize;
                let mut cut = s.write_all(b"GET /").is_err();
                while !cut && sent < 64 << 20 {
                    match s.write_all(&chunk) {
                        Ok(()) => sent += chunk.len(),
                        Err(_) => cut = true,
                    }
                }
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
                (cut, sent, answer)
            })
        })
        .collect();
    for t in senders {
        let (cut, sent, answer) = t.join().unwrap();
        assert!(cut, "the server read {sent} bytes of one request line");
        assert!(sent < 16 << 20, "cut off early, not after {sent} bytes");
        if let Ok((code, _, _)) = parse_response(&answer) {
            assert_eq!(code, 431, "a too-long head");
        }
    }
    assert_status_is_fast(&root);
    assert_rss_near(pid, baseline, "after 4 endless request lines");
    let d = root.daemon("idle");
    assert_eq!((d.state, d.pid), (DaemonState::Running, Some(idle)));
    assert_eq!(request(&a, "GET", "/health", "").0, 200, "still serving");
}

#[test]
fn a_thousand_idle_connections_do_not_starve_supervision() {
    let root = root_with(IDLE_DAEMON);
    // The supervisor (booted by this `start`) inherits the 1024-descriptor limit.
    let out = root
        .cmd_via(&["prlimit", "--nofile=1024"], &["start", "idle"])
        .output()
        .expect("prlimit (util-linux)");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let pid = root.supervisor_pid().unwrap();
    let nofile = procfs::limit(pid, "Max open files").unwrap();
    assert_eq!(nofile.soft, Some(1024), "{nofile:?}");
    let a = addr(&root);
    // This test process needs its own 1000 descriptors: raise its soft limit if it is low.
    let own = procfs::limit(std::process::id(), "Max open files").unwrap();
    let (soft, hard) = (own.soft.unwrap_or(u64::MAX), own.hard.unwrap_or(u64::MAX));
    if soft < 2048 {
        let want = hard.min(4096);
        assert!(
            want >= 1100,
            "this test needs 1100 descriptors; the hard limit is {hard}"
        );
        let me = std::process::id().to_string();
        let raised = Command::new("prlimit")
            .args(["--pid", &me, &format!("--nofile={want}:")])
            .status()
            .unwrap();
        assert!(
            raised.success(),
            "cannot raise this test's descriptor limit"
        );
    }

    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|i| {
            TcpStream::connect_timeout(&a.parse().unwrap(), T)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // 128 (http.max_connections) are served and stay open, idle; the rest are closed at once.
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    let closed = |conns: &[TcpStream]| {
        conns
            .iter()
            .filter(
                |c| !matches!(c.peek(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock),
            )
            .count()
    };
    let mut n = 0;
    assert!(
        wait_until(T, || {
            n = closed(&conns);
            n >= 1000 - 128
        }),
        "only {n} connections beyond the cap were refused"
    );
    assert_eq!(closed(&conns), 1000 - 128, "the 128 served ones stay open");
    let refused = conns
        .iter_mut()
        .find(|c| !matches!(c.peek(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock))
        .unwrap();
    refused.set_nonblocking(false).unwrap();
    refused.set_read_timeout(Some(T)).unwrap();
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer);
    assert_eq!(parse_response(&answer).unwrap().0, 503);
    // And one more, while all slots are taken, is refused too (the 503 may be lost to a reset if
    // the request arrived before the refusal).
    match exchange(&a, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") {
        Ok((code, _, _)) => assert_eq!(code, 503),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }

    // Supervision does not notice: status answers, and a killed daemon is respawned.
    assert_status_is_fast(&root);
    let idle = root.pid("idle").unwrap();
    signal(idle, SIGKILL);
    assert!(
        wait_until(T, || {
            let d = root.daemon("idle");
            d.state == DaemonState::Running && d.pid.is_some_and(|p| p != idle)
        }),
        "idle was not respawned:\n{}",
        root.master_log()
    );
    assert!(
        !root.master_log().contains("Too many open files"),
        "{}",
        root.master_log()
    );

    // Slots come back when clients leave.
    drop(conns);
    assert!(wait_until(T, || request(&a, "GET", "/health", "").0 == 200));
}

/// One POST on a fresh connection. With `send_body: false` only the head goes out, so the answer
/// shows the server decided without reading the body. None when the server closed the
/// connection before the answer could be read (it may, on a body it refuses).
fn post(a: &str, auth: &str, len: usize, body: &[u8], send_body: bool) -> Option<u16> {
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    let head = format!(
        "POST /event HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).ok()?;
    if send_body {
        // A refused body may be cut off by a reset: then the answer decides.
        let _ = s.write_all(body);
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    parse_response(&answer).ok().map(|r| r.0)
}

#[test]
fn a_flood_of_large_posts_is_bounded() {
    let (root, a) = idle_root();
    let pid = root.supervisor_pid().unwrap();
    let auth = bearer(&token(&root));
    // ~1 MB of JSON that never closes (the issue's flood: 1 MB bodies): refused by its size before
    // anything parses it.
    let mut open_json = br#"{"type": "NEW_GAMES_AVAILABLE", "payload": {"pad": ""#.to_vec();
    open_json.resize(1_000_000, b'a');
    let over = vec![b'a'; (1 << 20) + 1];

    // Each round: the same mix, four clients at once.
    let round = |count: usize| {
        let started = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (a, auth, open_json, over) =
                    (a.clone(), auth.clone(), open_json.clone(), over.clone());
                std::thread::spawn(move || {
                    for i in (w..count).step_by(4) {
                        match i % 5 {
                            // 1 MB, sent in full: far over the largest event, 413 (or a reset,
                            // when the server closes with the rest of the body unread).
                            0 | 1 => {
                                let code = post(&a, &auth, open_json.len(), &open_json, true);
                                assert!(matches!(code, None | Some(413)), "{code:?}");
                            }
                            // Over 1 MiB: 413 from Content-Length, before a byte of it is read.
                            2 => assert_eq!(post(&a, &auth, over.len(), &over, false), Some(413)),
                            // Unauthenticated: 401 without reading the body ...
                            3 => assert_eq!(
                                post(&a, "", open_json.len(), &open_json, false),
                                Some(401)
                            ),
                            // ... and with it sent anyway, 401 or a reset, never a read.
                            _ => {
                                let code = post(&a, "", open_json.len(), &open_json, true);
                                assert!(matches!(code, None | Some(401)), "{code:?}");
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        started.elapsed()
    };
    round(40);
    let baseline = rss_baseline(&root, &a, pid);
    let took = round(1000);
    eprintln!("1000 posts took {took:?}");
    assert_status_is_fast(&root);
    assert_rss_near(pid, baseline, "after 1000 posts of ~1 MB");

    // A chunked body is held to the same limit while it is read.
    let mut s = TcpStream::connect(&a).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    let head = format!(
        "POST /event HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut sent = 0;
    while sent <= 1 << 20 {
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "a".repeat(64 * 1024));
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
        sent += 64 * 1024;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    if let Ok((code, _, _)) = parse_response(&answer) {
        assert_eq!(code, 413);
    }
    assert_eq!(root.state("idle"), DaemonState::Running);
}

#[test]
fn polling_events_with_since_pages_forward_without_gaps() {
    let (root, a) = idle_root();
    for i in 0..25 {
        root.ok(&[
            "emit",
            "NEW_GAMES_AVAILABLE",
            &format!(r#"{{"config_key":"hex8_2p","new_games":{i}}}"#),
        ]);
    }
    let last = root.status().events.last_seq;
    // Pages of 10 from the start: every event exactly once, oldest first.
    let mut since = 0;
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..100 {
        let (code, _, body) = request(&a, "GET", &format!("/events?since={since}&limit=10"), "");
        assert_eq!(code, 200, "{body}");
        let v = json(&body);
        let page: Vec<u64> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert!(page.len() <= 10);
        seen.extend(&page);
        match v["next_since"].as_u64() {
            Some(next) => since = next,
            None => break,
        }
    }
    assert_eq!(seen, (1..=last).collect::<Vec<_>>());
    // Without since: the newest `limit`.
    let (_, _, body) = request(&a, "GET", "/events?limit=3", "");
    let newest: Vec<u64> = json(&body)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(newest, vec![last - 2, last - 1, last]);
}
