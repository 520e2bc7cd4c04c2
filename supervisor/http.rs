//! The monitoring HTTP server (127.0.0.1:8770 by default): hyper's HTTP/1.1 server on a thread of
//! its own with its own current-thread runtime.
//!
//! It asks the core for data through the same channel as the CLI, so no amount of HTTP traffic can
//! stall restarts or heartbeats: the core answers a status request in microseconds and never waits
//! on a socket. What a client can make this thread hold is bounded:
//!
//! - connections: at most `http.max_connections` at once (one semaphore permit each); one more is
//!   answered with a fixed 503 and closed at once, never queued, so descriptors stay bounded and
//!   the supervisor can always open the files and pipes a respawn needs;
//! - the request head: hyper's read buffer ([`MAX_HEAD`]), so a request line without a newline is
//!   cut off (431) at that size;
//! - time: a request head must arrive within [`IDLE`] of the connection opening or of the previous
//!   response (in hyper 1.x the header-read timer also runs while a keep-alive connection is idle),
//!   a body within [`BODY_TIME`], and a response write that makes no progress for [`IDLE`] ends
//!   the connection ([`WriteDeadline`]);
//! - bodies: only write routes read one, only after the bearer token checked out, at most
//!   [`MAX_BODY`] (413 from Content-Length before reading, and enforced while reading chunks).
//!
//! Write routes need `Authorization: Bearer <run/http.token>` (see [`token`]); read routes are open
//! to whoever can reach the address. JSON everywhere except /metrics (Prometheus text format).

mod metrics;
mod routes;
mod token;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ringrift::config::HttpConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::core::Msg;
use crate::logwriter::SupervisorLog;
use routes::{Response, Route};
use token::{Change, TokenFile};

/// hyper's read buffer, and so the largest request head (the request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// The largest request body; larger ones get 413. The one write route takes an event, whose
/// payload is at most `ringrift::events::MAX_PAYLOAD_BYTES`; 16 KiB more covers its envelope. A
/// larger body could only be refused later, after the core had parsed it.
const MAX_BODY: usize = ringrift::events::MAX_PAYLOAD_BYTES + 16 * 1024;
/// At most one "refused" line per this many seconds in the supervisor's log (a flood of
/// unauthenticated requests must not rotate the history away); the next line counts the others.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for a request head (also between keep-alive requests) and for a stalled write.
const IDLE: Duration = Duration::from_secs(30);
/// Longest wait for a whole request body once its head is in.
const BODY_TIME: Duration = Duration::from_secs(30);
/// What a connection over the cap gets before it is closed (written without waiting).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 39\r\nConnection: close\r\n\r\n{\"error\": \"too many HTTP connections\"}\n";

/// What every connection task shares.
struct Shared {
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    token: TokenFile,
    /// When a refusal was last logged, and how many were not logged since.
    refusals: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// Writes the bearer token, binds the address and serves it on a thread of its own. Returns the
/// bound address.
pub(crate) fn start(
    config: &HttpConfig,
    run_dir: &Path,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) -> io::Result<SocketAddr> {
    let token = TokenFile::new(run_dir);
    let change = token.refresh().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot write run/{}: {e}", token::FILE_NAME),
        )
    })?;
    log_token_change(&log, &change);
    let std_listener = std::net::TcpListener::bind(config.addr)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let shared = Arc::new(Shared {
        core,
        log,
        token,
        refusals: std::sync::Mutex::new((None, 0)),
    });
    let max_connections = config.max_connections;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    shared
                        .log
                        .error(&format!("http: cannot start its runtime: {e}"));
                    return;
                }
            };
            rt.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(listener) => serve(listener, max_connections, shared).await,
                    Err(e) => shared.log.error(&format!("http: {e}")),
                }
            });
        })?;
    Ok(bound)
}

fn log_token_change(log: &SupervisorLog, change: &Change) {
    let file = token::FILE_NAME;
    match change {
        Change::Unchanged => {}
        Change::Reloaded => log.info(&format!("http: using the bearer token in run/{file}")),
        Change::Created => log.info(&format!("http: wrote a new bearer token to run/{file}")),
        Change::Replaced(why) => log.warn(&format!(
            "http: run/{file} was {why}; wrote a new bearer token"
        )),
    }
}

async fn serve(listener: TcpListener, max_connections: usize, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE)
        .max_buf_size(MAX_HEAD)
        // A client that shuts down its side after the request (`nc -N`, some HTTP/1.0 tools)
        // still gets its answer.
        .half_close(true)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let mut refusals = Refusals::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait a little instead of spinning.
                shared.log.warn(&format!("http: accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Best effort and never waiting: the socket is closed when `stream` drops. Reading
            // what already arrived makes that close a FIN rather than a reset that could destroy
            // the 503 before the client reads it.
            let _ = stream.try_write(REFUSED);
            let _ = stream.try_read(&mut [0u8; 4096]);
            refusals.note(&shared.log, max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(|req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared, peer).await) }
            });
            let io = TokioIo::new(WriteDeadline::new(stream, IDLE));
            // Errors here are the client's (a reset, a timeout, a malformed request hyper has
            // already answered): nothing to report.
            let _ = builder.serve_connection(io, service).await;
            drop(slot);
        });
    }
}

/// Connections refused over the cap, logged at most every ten seconds so a flood cannot fill the
/// log.
#[derive(Default)]
struct Refusals {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, log: &SupervisorLog, cap: usize) {
        self.since_logged += 1;
        if self
            .logged_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            log.warn(&format!(
                "http: refused {} connection(s): {cap} already open (http.max_connections)",
                self.since_logged
            ));
            self.since_logged = 0;
            self.logged_at = Some(Instant::now());
        }
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    shared: &Shared,
    peer: SocketAddr,
) -> hyper::Response<Full<Bytes>> {
    // Origin-form and absolute-form targets alike (RFC 9112 §3.2.2): route on the path.
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let response = match Route::parse(req.method().as_str(), &path) {
        Err(r) => r,
        Ok(route) if route.is_write() => match authorize(&req, shared, peer, &path) {
            Err(r) => r,
            Ok(()) => match read_body(req).await {
                Ok(body) => routes::write(&route, &body, &shared.core).await,
                Err(r) => r,
            },
        },
        Ok(route) => routes::read(&route, &query, &shared.core).await,
    };
    into_hyper(response)
}

/// Checks the bearer token of a write request, before anything of its body is read.
fn authorize(
    req: &hyper::Request<Incoming>,
    shared: &Shared,
    peer: SocketAddr,
    path: &str,
) -> Result<(), Response> {
    match shared.token.refresh() {
        Ok(change) => log_token_change(&shared.log, &change),
        Err(e) => {
            shared.log.error(&format!(
                "http: cannot read or write run/{}: {e}; refusing writes",
                token::FILE_NAME
            ));
            return Err(Response::error(
                503,
                "the supervisor cannot read its token file",
            ));
        }
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .map(|v| match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => Some(v[7..].trim_ascii()),
            _ => None,
        });
    let why = match presented {
        Some(Some(t)) if shared.token.matches(t) => return Ok(()),
        Some(Some(_)) => "a wrong bearer token",
        Some(None) => "an Authorization header that is not a bearer token",
        None => "no bearer token",
    };
    {
        let mut r = shared.refusals.lock().expect("refusal log lock");
        let now = std::time::Instant::now();
        if r.0
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
        {
            let others = match r.1 {
                0 => String::new(),
                n => format!(" ({n} more refused since the last such line)"),
            };
            shared.log.warn(&format!(
                "http: refused {} {path} from {peer}: {why}{others}",
                req.method()
            ));
            *r = (Some(now), 0);
        } else {
            r.1 += 1;
        }
    }
    let mut r = Response::error(
        401,
        &format!(
            "{why}: write routes need 'Authorization: Bearer <token>' with the token in run/{}",
            token::FILE_NAME
        ),
    );
    let challenge = if matches!(presented, Some(Some(_))) {
        "Bearer realm=\"ringrift\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"ringrift\""
    };
    r.headers.push(("www-authenticate", challenge.to_string()));
    Err(r)
}

/// Reads a body of at most [`MAX_BODY`] bytes within [`BODY_TIME`].
async fn read_body(req: hyper::Request<Incoming>) -> Result<Bytes, Response> {
    let too_large = || Response::error(413, &format!("request body over {MAX_BODY} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_TIME, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(Response::error(400, &format!("cannot read the body: {e}"))),
        Err(_) => Err(Response::error(
            408,
            &format!("the body did not arrive within {}s", BODY_TIME.as_secs()),
        )),
    }
}

fn into_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *out.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = out.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    for (name, value) in r.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.append(name, v);
        }
    }
    out
}

/// A stream whose writes fail once they have made no progress for `limit`: a client that stops
/// reading its responses cannot hold its connection (and its slot) for ever.
struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when a write is pending: starts the stall timer, or fails once it has run out.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(
        &mut self,
        r: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progressed(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        // A pipe whose reader never reads: writes fill its buffer, then stay pending.
        let (client, _reader) = tokio::io::duplex(64);
        let limit = Duration::from_millis(100);
        let mut w = WriteDeadline::new(client, limit);
        w.write_all(&[0; 64]).await.unwrap();
        let start = tokio::time::Instant::now();
        let err = w.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= limit);
    }
}
