//! The monitoring HTTP server (127.0.0.1:8770 by default).
//!
//! It runs on its own thread with its own small runtime and asks the core for data through the same
//! channel as the CLI, so no amount of HTTP traffic can stall restarts or heartbeats: the core
//! answers a status request in microseconds and never waits on a socket. HTTP/1.1 with keep-alive,
//! bounded request sizes, JSON everywhere except /metrics (Prometheus text format).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringrift::lifecycle::DaemonState;
use ringrift::protocol::{FromSupervisor, StatusReport, ToSupervisor};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::core::Msg;
use crate::logwriter::SupervisorLog;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const IDLE: Duration = Duration::from_secs(30);
const ROUTES: &str = "GET /health, GET /ready, GET /daemon/status, GET /daemon/<name>/health, GET /metrics, GET /events, POST /event";

/// Binds the address and serves it on a thread of its own. Returns the bound address.
pub(crate) fn start(
    addr: SocketAddr,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log.error(&format!("http: cannot start its runtime: {e}"));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log.error(&format!("http: {e}"));
                        return;
                    }
                };
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(connection(stream, core.clone()));
                        }
                        Err(e) => {
                            log.warn(&format!("http: accept failed: {e}"));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        })?;
    Ok(bound)
}

struct Request {
    method: String,
    path: String,
    query: String,
    body: Vec<u8>,
    keep_alive: bool,
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, v: &Value) -> Response {
        let mut body = serde_json::to_vec_pretty(v).expect("json serializes");
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    fn error(status: u16, msg: &str) -> Response {
        Response::json(status, &json!({ "error": msg }))
    }
}

async fn connection(stream: TcpStream, core: mpsc::UnboundedSender<Msg>) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let request = match tokio::time::timeout(IDLE, read_request(&mut reader)).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(msg)) => {
                let _ = write_response(&mut write, &Response::error(400, &msg), false).await;
                return;
            }
        };
        let response = route(&request, &core).await;
        if write_response(&mut write, &response, request.keep_alive)
            .await
            .is_err()
            || !request.keep_alive
        {
            return;
        }
    }
}

/// Ok(None) on a clean end of the connection; Err(message) on a malformed request.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Request>, String> {
    let mut head = Vec::new();
    loop {
        let n = r
            .read_until(b'\n', &mut head)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err("the request ended inside its head".into())
            };
        }
        if head.len() > MAX_HEAD {
            return Err(format!("request head over {MAX_HEAD} bytes"));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
        // Tolerate blank lines before the request line.
        if head == b"\r\n" || head == b"\n" {
            head.clear();
        }
    }
    let text =
        std::str::from_utf8(&head).map_err(|_| "the request head is not UTF-8".to_string())?;
    let mut lines = text.lines();
    let start = lines.next().unwrap_or_default();
    let mut parts = start.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line '{start}'"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol '{version}'"));
    }
    let mut content_length = 0usize;
    let mut keep_alive = version == "HTTP/1.1";
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => {
                content_length = v.parse().map_err(|_| format!("bad Content-Length '{v}'"))?
            }
            "connection" => {
                keep_alive = !v.eq_ignore_ascii_case("close")
                    && (keep_alive || v.eq_ignore_ascii_case("keep-alive"))
            }
            "transfer-encoding" => {
                return Err("chunked request bodies are not supported; send Content-Length".into());
            }
            _ => {}
        }
    }
    if content_length > MAX_BODY {
        return Err(format!("request body over {MAX_BODY} bytes"));
    }
    let mut body = vec![0u8; content_length];
    r.read_exact(&mut body)
        .await
        .map_err(|e| format!("incomplete body: {e}"))?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body,
        keep_alive,
    }))
}

async fn write_response<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    r: &Response,
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    out.extend_from_slice(&r.body);
    w.write_all(&out).await
}

async fn ask(core: &mpsc::UnboundedSender<Msg>, frame: ToSupervisor) -> Option<FromSupervisor> {
    let (tx, rx) = oneshot::channel();
    core.send(Msg::Request {
        frame,
        reply: tx,
        stream: None,
    })
    .ok()?;
    rx.await.ok()
}

async fn status(core: &mpsc::UnboundedSender<Msg>) -> Result<StatusReport, Response> {
    match ask(core, ToSupervisor::Status { name: None }).await {
        Some(FromSupervisor::Status(s)) => Ok(s),
        _ => Err(Response::error(503, "the supervisor is shutting down")),
    }
}

async fn route(req: &Request, core: &mpsc::UnboundedSender<Msg>) -> Response {
    let segments: Vec<&str> = req
        .path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let result = match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["health"]) => status(core).await.map(|s| {
            Response::json(200, &json!({ "status": "ok", "pid": s.supervisor.pid, "uptime_secs": s.supervisor.uptime_secs }))
        }),
        ("GET", ["ready"]) => status(core).await.map(|s| ready(&s)),
        ("GET", ["daemon", "status"]) => status(core).await.map(|s| Response::json(200, &serde_json::to_value(&s).expect("serializes"))),
        ("GET", ["daemon", name, "health"]) => Ok(daemon_health(core, name).await),
        ("GET", ["metrics"]) => status(core).await.map(|s| Response { status: 200, content_type: "text/plain; version=0.0.4", body: metrics(&s).into_bytes() }),
        ("GET", ["events"]) => Ok(list_events(core, &req.query).await),
        ("POST", ["event"]) => Ok(post_event(core, &req.body).await),
        (_, ["health"] | ["ready"] | ["daemon", "status"] | ["daemon", _, "health"] | ["metrics"] | ["events"] | ["event"]) => {
            Err(Response::error(405, &format!("{} is not allowed on {}; routes: {ROUTES}", req.method, req.path)))
        }
        _ => Err(Response::error(404, &format!("no route {} {}; routes: {ROUTES}", req.method, req.path))),
    };
    result.unwrap_or_else(|r| r)
}

fn ready(s: &StatusReport) -> Response {
    let not_ready: Vec<Value> = s
        .daemons
        .iter()
        .filter(|d| {
            matches!(
                d.state,
                DaemonState::Waiting
                    | DaemonState::Initializing
                    | DaemonState::Backoff
                    | DaemonState::Failed
            )
        })
        .map(|d| json!({ "name": d.name, "state": d.state }))
        .collect();
    let running = s
        .daemons
        .iter()
        .filter(|d| d.state == DaemonState::Running)
        .count();
    let ok = not_ready.is_empty() && running > 0;
    Response::json(
        if ok { 200 } else { 503 },
        &json!({ "ready": ok, "running": running, "not_ready": not_ready }),
    )
}

async fn daemon_health(core: &mpsc::UnboundedSender<Msg>, name: &str) -> Response {
    match ask(
        core,
        ToSupervisor::Status {
            name: Some(name.to_string()),
        },
    )
    .await
    {
        Some(FromSupervisor::Status(s)) => {
            let Some(d) = s.daemons.first() else {
                return Response::error(404, &format!("unknown daemon '{name}'"));
            };
            let alive = matches!(d.state, DaemonState::Running | DaemonState::Paused);
            let healthy = alive && (d.health.healthy || d.kind == "external");
            let message = if alive {
                d.health.message.clone()
            } else {
                d.reason
                    .clone()
                    .unwrap_or_else(|| format!("daemon is {}", d.state))
            };
            let body = json!({
                "name": d.name,
                "healthy": healthy,
                "state": d.state,
                "status": if alive { d.health.status.clone() } else { d.state.as_str().to_ascii_lowercase() },
                "message": message,
                "details": d.health.details,
                "timestamp": ringrift::timefmt::now_rfc3339(),
            });
            Response::json(if healthy { 200 } else { 503 }, &body)
        }
        Some(FromSupervisor::Error { message, .. }) => Response::error(404, &message),
        _ => Response::error(503, "the supervisor is shutting down"),
    }
}

async fn post_event(core: &mpsc::UnboundedSender<Msg>, body: &[u8]) -> Response {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Response::error(400, &format!("the body is not JSON: {e}")),
    };
    let Some(event_type) = v.get("type").and_then(Value::as_str) else {
        return Response::error(
            400,
            "the body needs \"type\" (a string) and \"payload\" (an object)",
        );
    };
    let payload = v
        .get("payload")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    if let Some(extra) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "type" && *k != "payload"))
    {
        return Response::error(
            400,
            &format!("unknown field '{extra}' in the body (expected \"type\" and \"payload\")"),
        );
    }
    match ask(
        core,
        ToSupervisor::Emit {
            event_type: event_type.to_string(),
            payload,
            source: Some("http".into()),
        },
    )
    .await
    {
        Some(FromSupervisor::Emitted {
            seq,
            id,
            event_type,
        }) => Response::json(
            200,
            &json!({ "ok": true, "seq": seq, "id": id, "type": event_type }),
        ),
        Some(FromSupervisor::Error { message, .. }) => Response::error(400, &message),
        _ => Response::error(503, "the supervisor is shutting down"),
    }
}

async fn list_events(core: &mpsc::UnboundedSender<Msg>, query: &str) -> Response {
    let mut since = None;
    let mut types = Vec::new();
    let mut limit = Some(100);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => match v.parse() {
                Ok(n) => since = Some(n),
                Err(_) => {
                    return Response::error(
                        400,
                        &format!("since must be a sequence number, got '{v}'"),
                    );
                }
            },
            "type" => types.push(v.to_string()),
            "limit" => match v.parse() {
                Ok(n) => limit = Some(n),
                Err(_) => {
                    return Response::error(400, &format!("limit must be a number, got '{v}'"));
                }
            },
            other => {
                return Response::error(
                    400,
                    &format!("unknown query parameter '{other}' (since, type, limit)"),
                );
            }
        }
    }
    // The listing is streamed by the core on a channel; collect it here.
    let (stream_tx, mut stream_rx) = mpsc::unbounded_channel();
    let (tx, rx) = oneshot::channel();
    let frame = ToSupervisor::Events {
        since,
        types,
        follow: false,
        limit,
    };
    if core
        .send(Msg::Request {
            frame,
            reply: tx,
            stream: Some(stream_tx),
        })
        .is_err()
    {
        return Response::error(503, "the supervisor is shutting down");
    }
    match rx.await {
        Ok(FromSupervisor::EndOfEvents {
            last_seq,
            next_since,
        }) => {
            let mut events = Vec::new();
            while let Ok(FromSupervisor::Event { event }) = stream_rx.try_recv() {
                events.push(event);
            }
            Response::json(
                200,
                &json!({ "last_seq": last_seq, "next_since": next_since, "events": events }),
            )
        }
        Ok(FromSupervisor::Error { message, .. }) => Response::error(400, &message),
        _ => Response::error(503, "the supervisor is shutting down"),
    }
}

/// Prometheus text exposition of the status report.
pub(crate) fn metrics(s: &StatusReport) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let lbl = |d: &str| format!("{{daemon=\"{}\"}}", escape(d));
    const STATES: [DaemonState; 8] = [
        DaemonState::Stopped,
        DaemonState::Waiting,
        DaemonState::Initializing,
        DaemonState::Running,
        DaemonState::Paused,
        DaemonState::ShuttingDown,
        DaemonState::Backoff,
        DaemonState::Failed,
    ];
    family(
        "ringrift_daemon_state",
        "gauge",
        "1 for the state each daemon is in",
        s.daemons
            .iter()
            .flat_map(|d| {
                STATES.iter().map(move |st| {
                    (
                        format!("{{daemon=\"{}\",state=\"{}\"}}", escape(&d.name), st),
                        f64::from(u8::from(d.state == *st)),
                    )
                })
            })
            .collect(),
    );
    family(
        "ringrift_daemon_restarts_total",
        "counter",
        "restarts since the supervisor started",
        s.daemons
            .iter()
            .map(|d| (lbl(&d.name), d.restarts as f64))
            .collect(),
    );
    family(
        "ringrift_daemon_uptime_seconds",
        "gauge",
        "age of the daemon's current process",
        s.daemons
            .iter()
            .filter_map(|d| d.uptime_secs.map(|u| (lbl(&d.name), u)))
            .collect(),
    );
    family(
        "ringrift_daemon_heartbeat_age_seconds",
        "gauge",
        "seconds since the last heartbeat",
        s.daemons
            .iter()
            .filter_map(|d| d.heartbeat_age_secs.map(|u| (lbl(&d.name), u)))
            .collect(),
    );
    family(
        "ringrift_daemon_healthy",
        "gauge",
        "1 when the daemon reports itself healthy",
        s.daemons
            .iter()
            .map(|d| (lbl(&d.name), f64::from(u8::from(d.health.healthy))))
            .collect(),
    );
    family(
        "ringrift_daemon_rss_bytes",
        "gauge",
        "resident memory of the daemon's process",
        s.daemons
            .iter()
            .filter_map(|d| d.rss_bytes.map(|u| (lbl(&d.name), u as f64)))
            .collect(),
    );
    family(
        "ringrift_daemon_cpu_seconds_total",
        "counter",
        "CPU time of the daemon's current process",
        s.daemons
            .iter()
            .filter_map(|d| d.cpu_secs.map(|u| (lbl(&d.name), u)))
            .collect(),
    );
    family(
        "ringrift_event_subscriber_backlog",
        "gauge",
        "events a subscriber has not acked yet",
        s.daemons
            .iter()
            .filter(|d| !d.subscriptions.is_empty())
            .map(|d| (lbl(&d.name), d.event_backlog as f64))
            .collect(),
    );
    family(
        "ringrift_events_routed_total",
        "counter",
        "events accepted since the supervisor started",
        vec![(String::new(), s.events.routed as f64)],
    );
    family(
        "ringrift_events_last_seq",
        "gauge",
        "sequence number of the newest event",
        vec![(String::new(), s.events.last_seq as f64)],
    );
    family(
        "ringrift_jobs_running",
        "gauge",
        "jobs running now",
        vec![(String::new(), s.jobs.len() as f64)],
    );
    family(
        "ringrift_supervisor_uptime_seconds",
        "gauge",
        "seconds since the supervisor started",
        vec![(String::new(), s.supervisor.uptime_secs)],
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
