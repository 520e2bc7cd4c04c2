//! The control socket and the workers' own connections: framing, the hello handshake, bounded
//! outgoing queues, and routing frames to the core loop.
//!
//! Two kinds of connection reach the core:
//! - **CLI clients** on `run/supervisor.sock` (mode 0600 in a 0700 directory: the supervisor's user
//!   only). At most [`MAX_CONNECTIONS`] at once; one beyond that gets a `busy` error and is closed
//!   at once, so no number of clients can take the descriptors supervision needs.
//! - **Workers**, each on one end of a socket pair the supervisor made when it spawned that daemon
//!   ([`adopt_worker`]). The connection *is* the identity: a worker hello on the control socket is
//!   refused, whatever pid or name it claims, so nothing outside the tree can act as a daemon.
//!
//! Every connection's outgoing frames are encoded at once and queued for its writer task, at most
//! [`ConnTx`]'s byte limit: a client that does not read its replies is disconnected instead of
//! growing the supervisor. A bad frame is answered with a typed error and a log line; it never
//! ends the supervisor, and only a bad *first* frame (no hello) ends the connection.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ringrift::protocol::{
    self, ErrorCode, FD_ENV, FrameError, FrameReader, FromSupervisor, Hello as ProtoHello, Opening,
    PROTOCOL_VERSION, Request, Role, WorkerFrame,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::core::{Msg, Requester};
use crate::logwriter::SupervisorLog;

/// Control-socket connections open at once, at most. Workers do not count: they have their own.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Bytes queued for a CLI connection, at most (a status report is tens of KiB, an events page at
/// most `MAX_PAGE_BYTES` of the router).
pub(crate) const CLI_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Bytes queued for a worker, at most: its event window (512 events) plus control frames.
pub(crate) const WORKER_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// A client has this long to say hello before its connection is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    CONNECTION_IDS.fetch_add(1, Ordering::Relaxed)
}

/// Binds run/supervisor.sock with mode 0600, replacing a stale socket file.
pub(crate) fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Counts open connections, so that the supervisor can let its last answers go out before exiting.
#[derive(Clone, Default)]
pub(crate) struct OpenConnections(Arc<()>);

impl OpenConnections {
    pub(crate) fn count(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }
}

/// The connection's queue is over its limit, or its writer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Disconnected;

struct Shared {
    queued: AtomicUsize,
    limit: usize,
    dropped: AtomicBool,
    gone: Notify,
}

/// The outgoing side of one connection, as the core sees it: `send` never waits. Frames are encoded
/// at once and counted until the writer task has written them; past the limit the connection is
/// cut (the client is not reading) and every later `send` fails.
#[derive(Clone)]
pub(crate) struct ConnTx {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
}

/// The writer task's side of a [`ConnTx`].
pub(crate) struct ConnRx {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
}

impl ConnTx {
    /// A queue of at most `limit` bytes.
    pub(crate) fn new(limit: usize) -> (ConnTx, ConnRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            limit,
            dropped: AtomicBool::new(false),
            gone: Notify::new(),
        });
        (
            ConnTx {
                tx,
                shared: shared.clone(),
            },
            ConnRx { rx, shared },
        )
    }

    /// The connection has ended (or was cut): nothing sent now would arrive.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.dropped.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    pub(crate) fn send(&self, frame: FromSupervisor) -> Result<(), Disconnected> {
        if self.shared.dropped.load(Ordering::Relaxed) {
            return Err(Disconnected);
        }
        let bytes = protocol::encode(&frame);
        let queued = self.shared.queued.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len();
        if queued > self.shared.limit {
            self.cut();
            return Err(Disconnected);
        }
        self.tx.send(bytes).map_err(|_| Disconnected)
    }

    fn cut(&self) {
        self.shared.dropped.store(true, Ordering::Relaxed);
        self.shared.gone.notify_waiters();
        self.shared.gone.notify_one();
    }
}

impl Drop for ConnRx {
    fn drop(&mut self) {
        // A connection cut with megabytes queued leaves them free in the allocator; hand them back
        // to the system, so that the supervisor's RSS returns to where it was (glibc keeps freed
        // memory otherwise). Cheap, and only after such an event.
        if self.shared.dropped.load(Ordering::Relaxed) {
            while self.rx.try_recv().is_ok() {}
            release_free_memory();
        }
    }
}

/// Returns freed heap memory to the system (`malloc_trim(3)`, glibc only).
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

impl ConnTx {
    /// Resolves when the connection has been cut for not reading.
    async fn cut_off(&self) {
        if self.shared.dropped.load(Ordering::Relaxed) {
            return;
        }
        self.shared.gone.notified().await;
    }
}

impl ConnRx {
    /// True when no frame is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The next frame's bytes, or None once every sender is gone or the connection was cut.
    pub(crate) async fn recv(&mut self) -> Option<Vec<u8>> {
        if self.shared.dropped.load(Ordering::Relaxed) {
            return None;
        }
        let bytes = self.rx.recv().await?;
        self.shared.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        Some(bytes)
    }

    fn try_recv(&mut self) -> Option<Vec<u8>> {
        if self.shared.dropped.load(Ordering::Relaxed) {
            return None;
        }
        let bytes = self.rx.try_recv().ok()?;
        self.shared.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        Some(bytes)
    }

    /// Decodes the next queued frame, for in-process readers (the HTTP server collecting an
    /// events page, tests of the core and the router).
    pub(crate) fn try_frame(&mut self) -> Option<FromSupervisor> {
        let bytes = self.try_recv()?;
        Some(serde_json::from_slice(&bytes).expect("frames we encoded decode"))
    }
}

/// Writes whatever is queued, in batches: a burst of events costs one syscall, not one each.
async fn write_queue(mut rx: ConnRx, mut write: OwnedWriteHalf) {
    let mut batch = Vec::with_capacity(16 * 1024);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 256 * 1024
            && let Some(more) = rx.try_recv()
        {
            batch.extend_from_slice(&more);
        }
        if write.write_all(&batch).await.is_err() {
            break;
        }
        // A large batch should not keep its buffer for the connection's lifetime.
        if batch.capacity() > 1024 * 1024 {
            batch = Vec::with_capacity(16 * 1024);
        }
    }
}

pub(crate) async fn serve(
    listener: UnixListener,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    open: OpenConnections,
) {
    let mut refused: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if open.count() >= MAX_CONNECTIONS {
                    refused += 1;
                    // One line per power of two refused: a flood cannot flood the log too.
                    if refused.is_power_of_two() {
                        log.warn(&format!(
                            "control socket: {MAX_CONNECTIONS} connections open; refused {refused} so far"
                        ));
                    }
                    refuse_busy(stream);
                    continue;
                }
                let id = next_id();
                let token = open.clone();
                let (core, log) = (core.clone(), log.clone());
                tokio::spawn(async move {
                    connection(stream, id, core, log).await;
                    drop(token);
                });
            }
            Err(e) => {
                log.error(&format!("accept on the control socket failed: {e}"));
                // EMFILE and friends: give the system a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Tells a client beyond the cap why, without waiting on it, and closes.
fn refuse_busy(stream: UnixStream) {
    let frame = protocol::encode(&error(
        ErrorCode::Busy,
        &format!("the supervisor has {MAX_CONNECTIONS} control connections open; try again later"),
    ));
    let _ = stream.try_write(&frame);
}

/// What a hello said, once its version checked out.
struct Hello {
    role: Role,
    daemon: Option<String>,
}

/// Reads and checks the first frame. The error is the frame to answer with before closing.
/// `limit`: how long the client has (CLI clients); None for workers, whose hello is bounded by
/// their `ready_timeout` (a worker slow to start on a loaded machine is not a stranger).
async fn read_hello<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    frames: &mut FrameReader,
    limit: Option<Duration>,
) -> Result<Hello, Option<FromSupervisor>> {
    let limit = limit.unwrap_or(Duration::MAX);
    let first = match tokio::time::timeout(limit, frames.read_async(reader)).await {
        Ok(Ok(Some(Ok(line)))) => match protocol::decode::<Opening>(line) {
            Err(_) if protocol::frame_type(line).is_some_and(|t| t != "hello") => {
                let t = protocol::frame_type(line).unwrap_or_default();
                return Err(Some(error(
                    ErrorCode::UnexpectedFrame,
                    &format!("the first frame must be hello, got {t}"),
                )));
            }
            other => other,
        },
        Ok(Ok(Some(Err(e)))) => Err(e),
        Ok(Ok(None)) | Ok(Err(_)) => return Err(None),
        Err(_) => {
            return Err(Some(error(
                ErrorCode::BadFrame,
                &format!("no hello within {} s", limit.as_secs()),
            )));
        }
    };
    match first {
        Ok(Opening::Hello(ProtoHello {
            protocol: v,
            role,
            daemon,
            ..
        })) => {
            if v != PROTOCOL_VERSION {
                return Err(Some(error(
                    ErrorCode::ProtocolMismatch,
                    &format!(
                        "protocol version {v} is not supported; this supervisor speaks version {PROTOCOL_VERSION}"
                    ),
                )));
            }
            Ok(Hello { role, daemon })
        }
        Err(e) => Err(Some(error(
            frame_error_code(&e),
            &format!("bad hello: {e}"),
        ))),
    }
}

/// A connection on the control socket: CLI clients only.
async fn connection(
    stream: UnixStream,
    id: u64,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let mut frames = FrameReader::new();
    let refusal = match read_hello(&mut reader, &mut frames, Some(HELLO_TIMEOUT)).await {
        Ok(Hello {
            role: Role::Cli, ..
        }) => None,
        Ok(Hello {
            role: Role::Worker,
            daemon,
        }) => Some(error(
            ErrorCode::Forbidden,
            &format!(
                "a worker hello{} on the control socket is refused: a daemon speaks on the connection \
                 its supervisor handed it at spawn ({FD_ENV})",
                daemon.map(|d| format!(" for '{d}'")).unwrap_or_default()
            ),
        )),
        Err(answer) => answer,
    };
    if let Some(answer) = refusal {
        if let FromSupervisor::Error { message, .. } = &answer {
            log.warn(&format!("connection {id}: {message}"));
        }
        let _ = write.write_all(&protocol::encode(&answer)).await;
        return;
    }
    let (tx, rx) = ConnTx::new(CLI_QUEUE_BYTES);
    let writer = tokio::spawn(write_queue(rx, write));
    let _ = tx.send(FromSupervisor::Welcome {
        protocol: PROTOCOL_VERSION,
        config: None,
        leases: Vec::new(),
    });
    cli_session(&mut reader, &mut frames, id, &tx, &core, &log).await;
    drop(tx);
    let _ = writer.await;
}

async fn cli_session<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    frames: &mut FrameReader,
    id: u64,
    tx: &ConnTx,
    core: &mpsc::UnboundedSender<Msg>,
    log: &SupervisorLog,
) {
    loop {
        let frame = tokio::select! {
            f = frames.read_async(reader) => f,
            () = tx.cut_off() => break,
        };
        match frame {
            Ok(Some(Ok(line))) => match protocol::decode::<Request>(line) {
                Ok(frame) => {
                    let (reply_tx, reply_rx) = oneshot::channel();
                    let request = Msg::Request {
                        frame,
                        reply: reply_tx,
                        stream: Some(tx.clone()),
                        from: Requester::Cli,
                    };
                    if core.send(request).is_err() {
                        break;
                    }
                    // Requests on one connection are answered in order. A client that
                    // hangs up while waiting (timeout, Ctrl-C) drops its request.
                    let answer = tokio::select! {
                        answer = reply_rx => answer,
                        () = hung_up(reader) => break,
                    };
                    match answer {
                        Ok(answer) => {
                            if tx.send(answer).is_err() {
                                log.warn(&format!(
                                    "cli (connection {id}): disconnected: it left over {} MiB of replies unread",
                                    CLI_QUEUE_BYTES >> 20
                                ));
                                break;
                            }
                        }
                        // No answer: the core streams frames on this connection
                        // (`events -f`) until the client hangs up.
                        Err(_) => {
                            tokio::select! {
                                () = wait_for_hangup(reader) => {}
                                () = tx.cut_off() => {}
                            }
                            break;
                        }
                    }
                }
                Err(e) => bad_frame(log, tx, &format!("cli (connection {id})"), e),
            },
            Ok(Some(Err(e))) => bad_frame(log, tx, &format!("cli (connection {id})"), e),
            Ok(None) | Err(_) => break,
        }
    }
}

/// Serves a worker's end of the socket pair made for it at spawn: `daemon`'s process of spawn
/// `generation`, whatever its frames claim.
pub(crate) fn adopt_worker(
    stream: std::os::unix::net::UnixStream,
    daemon: String,
    generation: u64,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    tokio::spawn(worker_connection(
        stream,
        next_id(),
        daemon,
        generation,
        core,
        log,
    ));
    Ok(())
}

async fn worker_connection(
    stream: UnixStream,
    id: u64,
    daemon: String,
    generation: u64,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let mut frames = FrameReader::new();
    let who = format!("{daemon} (connection {id})");
    let refusal = match read_hello(&mut reader, &mut frames, None).await {
        Ok(Hello {
            role: Role::Worker,
            daemon: claimed,
        }) => match claimed {
            Some(c) if ringrift::catalog::normalize(&c) != daemon => Some(error(
                ErrorCode::Forbidden,
                &format!("this connection belongs to daemon {daemon}, not '{c}'"),
            )),
            _ => None,
        },
        Ok(Hello {
            role: Role::Cli, ..
        }) => Some(error(
            ErrorCode::UnexpectedFrame,
            "a daemon's connection speaks the worker protocol (role worker)",
        )),
        Err(answer) => answer,
    };
    if let Some(answer) = refusal {
        if let FromSupervisor::Error { message, .. } = &answer {
            log.warn(&format!("{who}: {message}"));
        }
        let _ = write.write_all(&protocol::encode(&answer)).await;
        return;
    }
    let (tx, rx) = ConnTx::new(WORKER_QUEUE_BYTES);
    let writer = tokio::spawn(write_queue(rx, write));
    let (reply_tx, reply_rx) = oneshot::channel();
    if core
        .send(Msg::WorkerHello {
            daemon: daemon.clone(),
            generation,
            conn_id: id,
            tx: tx.clone(),
            reply: reply_tx,
        })
        .is_err()
    {
        return;
    }
    match reply_rx.await {
        Ok(Ok((config, leases))) => {
            let _ = tx.send(FromSupervisor::Welcome {
                protocol: PROTOCOL_VERSION,
                config: Some(config),
                leases,
            });
        }
        Ok(Err(msg)) => {
            log.warn(&format!("{who}: hello refused: {msg}"));
            let _ = tx.send(error(ErrorCode::UnexpectedFrame, &msg.to_string()));
            drop(tx);
            let _ = writer.await;
            return;
        }
        Err(_) => return,
    }
    loop {
        let frame = tokio::select! {
            f = frames.read_async(&mut reader) => f,
            () = tx.cut_off() => {
                log.warn(&format!("{who}: disconnected: over {} MiB queued and unread", WORKER_QUEUE_BYTES >> 20));
                break;
            }
        };
        match frame {
            Ok(Some(Ok(line))) => match protocol::decode::<WorkerFrame>(line) {
                Ok(frame) => {
                    let _ = core.send(Msg::WorkerFrame {
                        daemon: daemon.clone(),
                        conn_id: id,
                        frame,
                    });
                }
                Err(e) => bad_frame(&log, &tx, &who, e),
            },
            Ok(Some(Err(e))) => bad_frame(&log, &tx, &who, e),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = core.send(Msg::WorkerGone {
        daemon,
        conn_id: id,
    });
    drop(tx);
    let _ = writer.await;
}

/// Resolves when the client has closed its end; never while it is connected (bytes it sends
/// meanwhile are left for the next read).
async fn hung_up<R: AsyncBufRead + Unpin>(r: &mut R) {
    match r.fill_buf().await {
        Ok([]) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Reads and drops whatever the client sends until it closes the connection.
async fn wait_for_hangup<R: AsyncBufRead + Unpin>(r: &mut R) {
    loop {
        match r.fill_buf().await {
            Ok([]) | Err(_) => return,
            Ok(b) => {
                let n = b.len();
                r.consume(n);
            }
        }
    }
}

fn frame_error_code(e: &FrameError) -> ErrorCode {
    if matches!(e, FrameError::TooLarge(..)) {
        ErrorCode::FrameTooLarge
    } else {
        ErrorCode::BadFrame
    }
}

fn bad_frame(log: &SupervisorLog, tx: &ConnTx, who: &str, e: FrameError) {
    log.warn(&format!("{who}: {e}"));
    let _ = tx.send(error(frame_error_code(&e), &e.to_string()));
}

fn error(code: ErrorCode, message: &str) -> FromSupervisor {
    FromSupervisor::Error {
        code,
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_that_is_not_drained_is_cut_at_its_limit() {
        let (tx, mut rx) = ConnTx::new(1000);
        let frame = || FromSupervisor::Error {
            code: ErrorCode::BadFrame,
            message: "x".repeat(250),
        };
        assert!(tx.send(frame()).is_ok());
        assert!(tx.send(frame()).is_ok());
        assert!(tx.send(frame()).is_ok());
        assert_eq!(
            tx.send(frame()),
            Err(Disconnected),
            "over 1000 bytes queued"
        );
        assert_eq!(tx.send(frame()), Err(Disconnected), "and stays cut");
        assert!(
            rx.try_frame().is_none(),
            "a cut connection writes nothing more"
        );
    }

    #[test]
    fn draining_makes_room_again() {
        let (tx, mut rx) = ConnTx::new(1000);
        for _ in 0..20 {
            tx.send(FromSupervisor::Error {
                code: ErrorCode::BadFrame,
                message: "x".repeat(300),
            })
            .unwrap();
            assert!(rx.try_frame().is_some());
        }
        assert!(tx.send(FromSupervisor::Shutdown).is_ok());
    }
}
