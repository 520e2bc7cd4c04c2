//! Issue 4: the monitoring HTTP server.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// A root whose supervisor listens on an ephemeral loopback port.
fn root_with(daemons: &str) -> Root {
    Root::with_config(&format!("http:\n  addr: 127.0.0.1:0\ndaemons:\n{daemons}"))
}

fn addr(root: &Root) -> String {
    root.status()["supervisor"]["http"]
        .as_str()
        .expect("http address in status")
        .to_string()
}

/// One request on a fresh connection: (status code, content type, body).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (code, ctype, body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
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
    let status = json(&body);
    let cli = root.status();
    assert_eq!(
        status["daemons"].as_array().unwrap().len(),
        cli["daemons"].as_array().unwrap().len(),
        "same report as status --json"
    );
    assert_eq!(status["supervisor"]["pid"], cli["supervisor"]["pid"]);

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
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("did you mean auto_sync"),
        "{body}"
    );

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
    assert!(json(&body)["error"].as_str().unwrap().contains("routes:"));
    assert_eq!(request(&a, "DELETE", "/metrics", "").0, 405);
}

#[test]
fn post_event_is_validated_like_emit() {
    let root = root_with("");
    root.ok(&["start", "auto_sync"]);
    let a = addr(&root);
    let (code, _, body) = request(
        &a,
        "POST",
        "/event",
        r#"{"type": "NEW_GAMES_AVAILABLE", "payload": {"config": "hex8_2p", "new_games": 1}}"#,
    );
    assert_eq!(code, 400);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("unknown field 'config' (did you mean 'config_key'?)"),
        "{body}"
    );
    let (code, _, body) = request(&a, "POST", "/event", "not json");
    assert_eq!(code, 400, "{body}");
    let (code, _, body) = request(
        &a,
        "POST",
        "/event",
        r#"{"type": "NEW_GAMES_AVAILABLE", "payload": {"config_key": "hex8_2p", "new_games": 1}}"#,
    );
    assert_eq!(code, 200, "{body}");
    let seq = json(&body)["seq"].as_u64().unwrap();
    let listed = root.ok(&["events", "--json", "--type", "NEW_GAMES_AVAILABLE"]);
    let ev: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(ev["seq"].as_u64(), Some(seq));
    assert_eq!(ev["source"], "http");
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
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
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
    loop {
        let s = root.daemon("steady");
        worst = worst.max(s["heartbeat_age_secs"].as_f64().unwrap_or(0.0));
        let v = root.daemon("victim");
        if v["state"] == "RUNNING"
            && v["pid"].as_u64().is_some_and(|p| p as u32 != victim)
            && done_rx.try_recv().is_err()
        {
            back_during_load = true;
        }
        if load.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20)); // poll interval while the load runs
    }
    load.join().unwrap();
    assert!(
        root.wait_state("victim", "RUNNING", T)["pid"]
            .as_u64()
            .unwrap() as u32
            != victim
    );
    let s = root.daemon("steady");
    assert_eq!(s["restarts"], 0, "steady's 1 s watchdog never fired");
    assert_eq!(s["pid"].as_u64(), Some(steady as u64));
    assert!(worst < 1.0, "heartbeat age reached {worst}s under load");
    assert!(
        back_during_load,
        "the victim was back RUNNING while the requests were still going"
    );
}
