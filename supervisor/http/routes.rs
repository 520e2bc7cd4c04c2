//! The routes: which requests exist, and the JSON each answers with. Everything here talks to the
//! core through its channel; nothing here touches a socket.

use ringrift::lifecycle::DaemonState;
use ringrift::protocol::{
    Emit, ErrorCode, EventsRequest, FromSupervisor, Request, StatusReport, StatusRequest,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Msg, Requester};

pub(crate) const ROUTES: &str = "GET /health, GET /ready, GET /daemon/status, GET /daemon/<name>/health, GET /pipeline, GET /metrics, GET /events, GET /cluster/status, POST /event (HEAD wherever GET)";

/// Default page of `GET /events`.
const DEFAULT_PAGE: usize = 100;
/// Largest page of `GET /events`; a larger `limit` is capped to it (page on with `since`).
pub(crate) const MAX_PAGE: usize = 1000;

/// A request the server knows, with its method already checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Health,
    Ready,
    Status,
    DaemonHealth(String),
    /// `GET /pipeline`: the per-key view of `status --json`'s `pipeline`.
    Pipeline,
    Metrics,
    Events,
    /// `GET /cluster/status`: `cluster status --json`.
    Cluster,
    /// A write route: needs the bearer token, and has a body.
    PostEvent,
}

impl Route {
    /// Finds the route of `method path`, or the 404/405 answer. HEAD is accepted wherever GET is.
    pub(crate) fn parse(method: &str, path: &str) -> Result<Route, Response> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (route, allowed) = match segments.as_slice() {
            ["health"] => (Route::Health, "GET"),
            ["ready"] => (Route::Ready, "GET"),
            ["daemon", "status"] => (Route::Status, "GET"),
            ["daemon", name, "health"] => (Route::DaemonHealth((*name).to_string()), "GET"),
            ["pipeline"] => (Route::Pipeline, "GET"),
            ["metrics"] => (Route::Metrics, "GET"),
            ["events"] => (Route::Events, "GET"),
            ["cluster", "status"] => (Route::Cluster, "GET"),
            ["event"] => (Route::PostEvent, "POST"),
            _ => {
                return Err(Response::error(
                    404,
                    &format!("no route {method} {path}; routes: {ROUTES}"),
                ));
            }
        };
        let ok = method == allowed || (allowed == "GET" && method == "HEAD");
        if ok {
            return Ok(route);
        }
        let mut r = Response::error(
            405,
            &format!("{method} is not allowed on {path}; routes: {ROUTES}"),
        );
        let allow = if allowed == "GET" {
            "GET, HEAD"
        } else {
            allowed
        };
        r.headers.push(("allow", allow.to_string()));
        Err(r)
    }

    pub(crate) fn is_write(&self) -> bool {
        matches!(self, Route::PostEvent)
    }
}

#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub(crate) fn json(status: u16, v: &Value) -> Response {
        let mut body = serde_json::to_vec_pretty(v).expect("json serializes");
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub(crate) fn error(status: u16, msg: &str) -> Response {
        Response::json(status, &json!({ "error": msg }))
    }
}

/// Answers a read route.
pub(crate) async fn read(
    route: &Route,
    query: &str,
    core: &mpsc::UnboundedSender<Msg>,
) -> Response {
    let result = match route {
        Route::Health => status(core).await.map(|s| {
            Response::json(
                200,
                &json!({ "status": "ok", "pid": s.supervisor.pid, "uptime_secs": s.supervisor.uptime_secs }),
            )
        }),
        Route::Ready => status(core).await.map(|s| ready(&s)),
        Route::Status => status(core).await.map(|s| {
            Response::json(200, &serde_json::to_value(&s).expect("serializes"))
        }),
        Route::DaemonHealth(name) => Ok(daemon_health(core, name).await),
        Route::Pipeline => status(core).await.map(|s| {
            Response::json(200, &serde_json::to_value(&s.pipeline).expect("serializes"))
        }),
        Route::Metrics => match status(core).await {
            Ok(s) => {
                let mut text = super::metrics::metrics(&s);
                if let Some(FromSupervisor::Cluster(c)) = ask(core, Request::ClusterStatus).await {
                    text.push_str(&super::metrics::cluster_metrics(&c));
                }
                Ok(Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4",
                    headers: Vec::new(),
                    body: text.into_bytes(),
                })
            }
            Err(r) => Err(r),
        },
        Route::Events => Ok(list_events(core, query).await),
        Route::Cluster => Ok(match ask(core, Request::ClusterStatus).await {
            Some(FromSupervisor::Cluster(c)) => {
                Response::json(200, &serde_json::to_value(&c).expect("serializes"))
            }
            Some(FromSupervisor::Error { message, .. }) => Response::error(404, &message),
            _ => Response::error(503, "the supervisor is shutting down"),
        }),
        Route::PostEvent => Err(Response::error(500, "a write route reached read()")),
    };
    result.unwrap_or_else(|r| r)
}

/// Answers a write route whose token was checked and whose body was read.
pub(crate) async fn write(
    route: &Route,
    body: &[u8],
    core: &mpsc::UnboundedSender<Msg>,
) -> Response {
    match route {
        Route::PostEvent => post_event(core, body).await,
        _ => Response::error(500, "a read route reached write()"),
    }
}

async fn ask(core: &mpsc::UnboundedSender<Msg>, frame: Request) -> Option<FromSupervisor> {
    let (tx, rx) = oneshot::channel();
    core.send(Msg::Request {
        frame,
        reply: tx,
        stream: None,
        from: Requester::Http,
    })
    .ok()?;
    rx.await.ok()
}

async fn status(core: &mpsc::UnboundedSender<Msg>) -> Result<StatusReport, Response> {
    match ask(core, Request::Status(StatusRequest::default())).await {
        Some(FromSupervisor::Status(s)) => Ok(s),
        _ => Err(Response::error(503, "the supervisor is shutting down")),
    }
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
        Request::Status(StatusRequest {
            name: Some(name.to_string()),
        }),
    )
    .await
    {
        Some(FromSupervisor::Status(s)) => {
            let Some(d) = s.daemons.first() else {
                return Response::error(404, &format!("unknown daemon '{name}'"));
            };
            let summary = d.summary();
            let message = match summary.message {
                m if m.is_empty() => format!("daemon is {}", d.state),
                m => m,
            };
            let body = json!({
                "name": d.name,
                "healthy": summary.healthy,
                "state": d.state,
                "status": summary.status,
                "message": message,
                "details": d.health.details,
                "timestamp": ringrift::timefmt::now_rfc3339(),
            });
            Response::json(if summary.healthy { 200 } else { 503 }, &body)
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
        Request::Emit(Emit {
            event_type: event_type.to_string(),
            payload,
            source: Some("http".into()),
        }),
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
        Some(FromSupervisor::Error {
            code: ErrorCode::Forbidden,
            message,
        }) => Response::error(403, &message),
        Some(FromSupervisor::Error { message, .. }) => Response::error(400, &message),
        _ => Response::error(503, "the supervisor is shutting down"),
    }
}

/// `since`, `type` (repeatable) and `limit` of `GET /events`; `limit` is capped at [`MAX_PAGE`].
#[derive(Debug, PartialEq)]
struct EventsQuery {
    since: Option<u64>,
    types: Vec<String>,
    limit: usize,
}

/// What is wrong with the query of `GET /events` (answered with 400 and this message).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum QueryError {
    #[error("since must be a sequence number, got '{0}'")]
    Since(String),
    #[error("limit must be a number, got '{0}'")]
    Limit(String),
    #[error("unknown query parameter '{0}' (since, type, limit)")]
    Unknown(String),
}

fn parse_events_query(query: &str) -> Result<EventsQuery, QueryError> {
    let mut q = EventsQuery {
        since: None,
        types: Vec::new(),
        limit: DEFAULT_PAGE,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => match v.parse() {
                Ok(n) => q.since = Some(n),
                Err(_) => return Err(QueryError::Since(v.to_string())),
            },
            "type" => q.types.push(v.to_string()),
            "limit" => match v.parse::<usize>() {
                Ok(n) => q.limit = n.min(MAX_PAGE),
                Err(_) => return Err(QueryError::Limit(v.to_string())),
            },
            other => return Err(QueryError::Unknown(other.to_string())),
        }
    }
    Ok(q)
}

async fn list_events(core: &mpsc::UnboundedSender<Msg>, query: &str) -> Response {
    let q = match parse_events_query(query) {
        Ok(q) => q,
        Err(e) => return Response::error(400, &e.to_string()),
    };
    // The listing is streamed by the core on a channel; collect it here.
    let (stream_tx, mut stream_rx) = crate::ipc::ConnTx::new(crate::ipc::CLI_QUEUE_BYTES);
    let (tx, rx) = oneshot::channel();
    // With `since`, a page goes forward from it (oldest first, `limit` at most), so that polling
    // with the last sequence number seen never skips anything; without it, the newest `limit`.
    let paging_forward = q.since.is_some();
    let frame = Request::Events(EventsRequest {
        since: q.since,
        types: q.types,
        follow: false,
        limit: (!paging_forward).then_some(q.limit),
    });
    if core
        .send(Msg::Request {
            frame,
            reply: tx,
            stream: Some(stream_tx),
            from: Requester::Http,
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
            while let Some(FromSupervisor::Event { event }) = stream_rx.try_frame() {
                events.push(event);
            }
            let mut next_since = next_since;
            if paging_forward && events.len() > q.limit {
                events.truncate(q.limit);
                next_since = events.last().map(|e| e.seq);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_path_with_head_wherever_get() {
        assert_eq!(Route::parse("GET", "/health").ok(), Some(Route::Health));
        assert_eq!(Route::parse("HEAD", "/metrics").ok(), Some(Route::Metrics));
        assert_eq!(Route::parse("GET", "/pipeline").ok(), Some(Route::Pipeline));
        assert_eq!(
            Route::parse("HEAD", "/pipeline").ok(),
            Some(Route::Pipeline)
        );
        assert_eq!(
            Route::parse("HEAD", "/daemon/auto_sync/health").ok(),
            Some(Route::DaemonHealth("auto_sync".into()))
        );
        assert_eq!(Route::parse("POST", "/event").ok(), Some(Route::PostEvent));
        assert!(Route::parse("POST", "/event").unwrap().is_write());
        assert!(!Route::parse("GET", "/events").unwrap().is_write());

        let r = Route::parse("DELETE", "/metrics").err().unwrap();
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, vec![("allow", "GET, HEAD".to_string())]);
        let r = Route::parse("HEAD", "/event").err().unwrap();
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, vec![("allow", "POST".to_string())]);
        let r = Route::parse("GET", "/nowhere").err().unwrap();
        assert_eq!(r.status, 404);
        assert!(String::from_utf8_lossy(&r.body).contains("routes:"));
    }

    #[test]
    fn events_query_keeps_its_messages_and_caps_the_page() {
        assert_eq!(
            parse_events_query("").unwrap(),
            EventsQuery {
                since: None,
                types: vec![],
                limit: 100
            }
        );
        let q = parse_events_query("since=5&type=A&type=B&limit=5000").unwrap();
        assert_eq!(q.since, Some(5));
        assert_eq!(q.types, vec!["A", "B"]);
        assert_eq!(q.limit, MAX_PAGE);
        assert_eq!(parse_events_query("limit=7").unwrap().limit, 7);
        let msg = |q: &str| parse_events_query(q).unwrap_err().to_string();
        assert_eq!(msg("since=x"), "since must be a sequence number, got 'x'");
        assert_eq!(msg("limit=-1"), "limit must be a number, got '-1'");
        assert_eq!(
            msg("follow=1"),
            "unknown query parameter 'follow' (since, type, limit)"
        );
        assert_eq!(
            parse_events_query("follow=1"),
            Err(QueryError::Unknown("follow".into()))
        );
    }
}
